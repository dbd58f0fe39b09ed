"""WHITENOTE_URL_POLICY and redirects: where the worker's HTTP calls may go.

The fakes live on 127.0.0.1, which the ``public`` policy refuses; so its "allowed" path
is shown on the check itself with public literal addresses (no request is made), and
through a local HTTP proxy (every byte stays on this host).  No test sends traffic to
an address other than loopback: an internal address is first shown to be refused by
the check alone, and only then given to a job.
"""
import dataclasses
import datetime
import secrets
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer

import pytest
from fake_model import FakeModel
from fake_model import Reply
from fake_model import tags
from fake_ragflow import FakeRagflow
from services import cli
from services import drain
from services import job_state
from services import make_message
from services import make_user
from services import model_config
from services import ragflow_config
from services import tag_names

import whitenote_huey
from models import Briefing
from whitenote_huey import PermanentError
from whitenote_huey import SettingsError
from whitenote_huey import load_settings
from whitenote_huey import outbound_url
from whitenote_huey import refused_address

DAY = datetime.date(2025, 6, 1)


@pytest.fixture
def policy(monkeypatch):
    """Run the worker under another WHITENOTE_URL_POLICY for one test."""
    def use(name: str, **changes) -> None:
        monkeypatch.setattr(whitenote_huey, 'settings', dataclasses.replace(
            whitenote_huey.settings, url_policy=name, **changes))
    return use


def test_policy_setting_defaults_to_any_and_a_bad_value_stops_the_program(tmp_path):
    assert load_settings({}).url_policy == 'any'
    assert load_settings({'WHITENOTE_URL_POLICY': ' Public '}).url_policy == 'public'
    with pytest.raises(SettingsError, match="WHITENOTE_URL_POLICY: 'private' is not any or public"):
        load_settings({'WHITENOTE_URL_POLICY': 'private'})
    result = cli({'WHITENOTE_URL_POLICY': 'strict'}, str(tmp_path), 'init-db')
    assert result.returncode == 1
    assert "bad setting: WHITENOTE_URL_POLICY: 'strict' is not any or public" in result.stderr


@pytest.mark.parametrize('address, kind', [
    ('127.0.0.1', 'loopback'), ('127.8.9.10', 'loopback'), ('::1', 'loopback'),
    ('10.1.2.3', 'private'), ('172.16.0.1', 'private'), ('192.168.1.1', 'private'),
    ('fc00::1', 'private'), ('fd12:3456::1', 'private'),
    ('169.254.169.254', 'link-local'), ('fe80::1', 'link-local'), ('fe80::1%1', 'link-local'),
    ('0.0.0.0', 'unspecified'), ('::', 'unspecified'),
    ('224.0.0.1', 'multicast'), ('ff02::1', 'multicast'),
    ('240.0.0.1', 'reserved'), ('198.51.100.7', 'private'), ('100.64.0.1', 'non-global'),
    ('::ffff:127.0.0.1', 'loopback'), ('::ffff:10.0.0.1', 'private'),
    ('::ffff:169.254.169.254', 'link-local'), ('::127.0.0.1', 'reserved'),
    ('2002:7f00:1::', 'loopback'), ('2002:a00:1::', 'private'),  # 6to4 of 127.0.0.1, 10.0.0.1
    ('64:ff9b::a9fe:a9fe', 'link-local'),  # NAT64 of 169.254.169.254
    ('8.8.8.8', None), ('1.1.1.1', None), ('2606:4700:4700::1111', None), ('::ffff:8.8.8.8', None),
])
def test_refused_addresses(address, kind):
    assert refused_address(address) == kind


@pytest.mark.parametrize('url', ['https://8.8.8.8', 'http://1.1.1.1:8080/v1/',
                                 'http://[2606:4700:4700::1111]:4000'])
def test_public_policy_lets_public_addresses_through(policy, url):
    policy('public')
    assert outbound_url(' %s ' % url, 'AiConfig.openaiBaseUrl') == url


@pytest.mark.parametrize('url, message', [
    ('http://127.0.0.1:4000', "'http://127.0.0.1:4000': 127.0.0.1 is not a public address (loopback)"),
    ('http://localhost:4000', "'http://localhost:4000': localhost (127.0.0.1) is not a public address (loopback)"),
    ('http://[::1]:4000', "'http://[::1]:4000': ::1 is not a public address (loopback)"),
    ('http://10.0.0.1', "'http://10.0.0.1': 10.0.0.1 is not a public address (private)"),
    ('http://169.254.169.254/latest', "169.254.169.254 is not a public address (link-local)"),
    ('http://[::ffff:192.168.0.1]', "::ffff:192.168.0.1 is not a public address (private)"),
    ('http://0.0.0.0', "'http://0.0.0.0': 0.0.0.0 is not a public address (unspecified)"),
])
def test_public_policy_refuses_internal_addresses_by_the_check_alone(policy, url, message):
    policy('public')
    with pytest.raises(PermanentError) as refused:
        outbound_url(url, 'AiConfig.ragflowBaseUrl')
    text = str(refused.value)
    assert text.startswith('AiConfig.ragflowBaseUrl ') and message in text
    assert text.endswith('refused by WHITENOTE_URL_POLICY=public')
    policy('any')
    assert outbound_url(url, 'AiConfig.ragflowBaseUrl') == url


@pytest.mark.parametrize('host', ['127.0.0.1', 'localhost', '[::1]', '10.0.0.1', '169.254.169.254'])
def test_public_policy_fails_jobs_on_internal_user_urls_before_any_request(
        db, redis_queue, model, ragflow, policy, host):
    policy('public')
    model_url = 'http://%s:%d' % (host, int(model.url.rsplit(':', 1)[1]))
    ragflow_url = 'http://%s:%d' % (host, ragflow.port)
    for url in (model_url, ragflow_url):  # refused by the check, so no job sends a byte there
        with pytest.raises(PermanentError, match='WHITENOTE_URL_POLICY=public'):
            outbound_url(url, 'test')
    user = make_user(config={**model_config(model), **ragflow_config(ragflow),
                             'openai_base_url': model_url, 'ragflow_base_url': ragflow_url})
    message = make_message(user, 'internal #network', datetime.datetime(2025, 6, 1, 12))
    assert whitenote_huey.enqueue_message_jobs(user.id, message.id) == ['auto-tag', 'sync-ragflow']
    whitenote_huey.daily_briefing(user.id, DAY)
    assert drain(whitenote_huey.huey) == 3  # none retried
    briefing = Briefing.get(Briefing.user_id == user.id)
    errors = {'auto-tag': job_state('auto-tag', message.id).last_error,
              'sync-ragflow': job_state('sync-ragflow', message.id).last_error,
              'daily-briefing': briefing.last_error}
    assert job_state('auto-tag', message.id).status == job_state('sync-ragflow', message.id).status \
        == briefing.status == 'failed'
    for kind, error in errors.items():
        setting = 'ragflowBaseUrl' if kind == 'sync-ragflow' else 'openaiBaseUrl'
        assert error.startswith('PermanentError: AiConfig.%s ' % setting), error
        assert error.endswith('refused by WHITENOTE_URL_POLICY=public')
    assert model.requests == [] and ragflow.requests == []
    assert tag_names(message.id) == []


def test_any_policy_lets_user_urls_on_loopback_work(db, redis_queue, model, ragflow, policy):
    policy('any')
    user = make_user(config=dict(model_config(model), **ragflow_config(ragflow)))
    message = make_message(user, 'local services')
    whitenote_huey.enqueue_message_jobs(user.id, message.id)
    drain(whitenote_huey.huey)
    assert job_state('auto-tag', message.id).status == 'done' and tag_names(message.id) == ['alpha', 'beta']
    assert job_state('sync-ragflow', message.id).status == 'done'


def test_public_policy_trusts_the_operators_own_urls(db, redis_queue, model, ragflow, policy):
    key = 'ragflow-env-%s' % secrets.token_hex(4)
    policy('public', openai_api_key=model.api_key, openai_base_url=model.url,
           ragflow_base_url=ragflow.url, ragflow_api_key=key, ragflow_dataset_id=ragflow.add_dataset(key))
    user = make_user(config={})  # no key or dataset of their own: the environment's are used
    message = make_message(user, 'on the operator\'s services')
    assert whitenote_huey.enqueue_message_jobs(user.id, message.id) == ['auto-tag', 'sync-ragflow']
    drain(whitenote_huey.huey)
    assert job_state('auto-tag', message.id).status == 'done'
    assert job_state('sync-ragflow', message.id).status == 'done'
    assert model.requests and ragflow.requests


# Redirects are never followed.

def test_model_redirect_is_not_followed(db, redis_queue, policy):
    policy('any')
    with FakeModel(api_key='sk-redirect-0001') as first, FakeModel(api_key='sk-redirect-0001') as target:
        target.default = tags('followed')
        # 307 keeps the method and body: the openai client's own default follows it.
        first.default = Reply(status=307, body=b'', headers={
            'Location': target.url + '/v1/chat/completions'})
        user = make_user(config=model_config(first))
        message = make_message(user, 'redirected')
        whitenote_huey.auto_tag(user.id, message.id)
        assert drain(whitenote_huey.huey) == 1
        assert len(first.requests) == 1 and target.requests == []
    state = job_state('auto-tag', message.id)
    assert state.status == 'failed' and tag_names(message.id) == []
    assert state.last_error == (
        'PermanentError: model endpoint answered HTTP 307, a redirect to %s/v1/chat/completions, '
        'which is not followed: set AiConfig.openaiBaseUrl to the final URL' % target.url)


def test_ragflow_redirect_is_not_followed(db, redis_queue, ragflow, policy):
    policy('any')
    with FakeRagflow() as target:
        config = ragflow_config(ragflow)
        target.add_dataset(config['ragflow_api_key'], config['ragflow_dataset_id'])
        location = '%s/api/v1/datasets/%s/documents' % (target.url, config['ragflow_dataset_id'])
        ragflow.fail_next('redirect', location=location)
        user = make_user(config=config)
        message = make_message(user, 'redirected')
        whitenote_huey.sync_ragflow(user.id, message.id)
        assert drain(whitenote_huey.huey) == 1
        assert ragflow.count() == 1 and target.requests == []
    state = job_state('sync-ragflow', message.id)
    assert state.status == 'failed' and ragflow.documents(config['ragflow_dataset_id']) == []
    assert state.last_error == (
        'PermanentError: RAGFlow upload answered HTTP 307, a redirect to %s, which is not '
        'followed: set AiConfig.ragflowBaseUrl to the final URL' % location)


class RedirectingProxy:
    """An HTTP proxy on 127.0.0.1 that answers every request with a 307 to ``location``.

    With HTTP_PROXY pointing at it, a public URL can "redirect to the internal network"
    while every connection goes to this host only.
    """

    def __init__(self, location: str):
        self.location = location
        self.requests: list[str] = []

    def __enter__(self) -> 'RedirectingProxy':
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def answer(self):
                self.rfile.read(int(self.headers.get('Content-Length') or 0))
                proxy.requests.append('%s %s' % (self.command, self.path))
                self.send_response(307)
                self.send_header('Location', proxy.location)
                self.send_header('Content-Length', '0')
                self.end_headers()

            do_GET = do_POST = do_DELETE = answer

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = 'http://127.0.0.1:%d' % self.server.server_address[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize('kind', ['auto-tag', 'sync-ragflow'])
def test_public_url_that_redirects_inside_is_not_followed(db, redis_queue, model, ragflow, policy,
                                                          monkeypatch, kind):
    policy('public')
    public = 'http://1.2.3.4'
    config = dict(ragflow_config(ragflow), ragflow_base_url=public, openai_base_url=public,
                  openai_api_key='sk-public-%s' % secrets.token_hex(6))
    inside = model.url + '/v1/chat/completions' if kind == 'auto-tag' else ragflow.url + '/'
    with RedirectingProxy(inside) as proxy:
        for name in ('NO_PROXY', 'no_proxy', 'ALL_PROXY', 'all_proxy', 'HTTPS_PROXY', 'https_proxy'):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv('HTTP_PROXY', proxy.url)
        monkeypatch.setenv('http_proxy', proxy.url)
        # Both HTTP clients take proxies from here: nothing can go to 1.2.3.4 itself.
        assert urllib.request.getproxies() == {'http': proxy.url}
        user = make_user(config=config)
        message = make_message(user, 'public, then inside')
        task = whitenote_huey.auto_tag if kind == 'auto-tag' else whitenote_huey.sync_ragflow
        task(user.id, message.id)
        # A failed auto-tag is followed by the sync, which is refused as well.
        runs = 2 if kind == 'auto-tag' else 1
        assert drain(whitenote_huey.huey) == runs
        assert len(proxy.requests) == runs
        assert all(request.startswith('POST http://1.2.3.4/') for request in proxy.requests)
    assert model.requests == [] and ragflow.requests == []
    state = job_state(kind, message.id)
    setting = 'openaiBaseUrl' if kind == 'auto-tag' else 'ragflowBaseUrl'
    assert state.status == 'failed'
    assert 'answered HTTP 307, a redirect to %s, which is not followed: set AiConfig.%s to the ' \
        'final URL' % (inside, setting) in state.last_error
