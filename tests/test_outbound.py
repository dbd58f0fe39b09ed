"""One user's endpoint must not hurt anyone else: every call bounded, the URL checked is
the URL called, nothing shared between users' calls.

The hostile endpoints are real HTTP servers on 127.0.0.1 (the fakes' drip, endless and
trap answers, and a capture server that counts connections); the four-worker test runs
the real consumer.  No test sends a byte to an address outside 127.0.0.0/8: a URL form
is first shown refused by the check alone, and a job given one runs with every proxy
setting pointing at the capture server, so that even a form wrongly let through would
land there and not leave the host.
"""
import dataclasses
import datetime
import json
import os
import re
import secrets
import time

import pytest
from fake_model import FakeModel
from fake_model import Reply
from fake_model import drip
from fake_model import endless
from fake_model import error
from fake_model import raw
from fake_model import tags
from fake_model import text
from fake_ragflow import FakeRagflow
from services import CaptureServer
from services import Consumer
from services import cli
from services import drain
from services import job_state
from services import make_message
from services import make_user
from services import model_config
from services import ragflow_config
from services import tag_names
from services import wait_for
from services import worker_env

import models
import whitenote_huey
from whitenote_huey import PermanentError

pytestmark = pytest.mark.usefixtures('db', 'redis_queue')


def run(task, user, message) -> models.JobState:
    task(user.id, message.id)
    drain(whitenote_huey.huey)
    return job_state('auto-tag' if task is whitenote_huey.auto_tag else 'sync-ragflow', message.id)


# 1. Every outbound call is bounded.

NESTED = '[' * 60_000  # 60 KB of "[": about 20 s of the interpreter per try, with quadratic parsing


@pytest.mark.parametrize('reply, status, attempts, reason', [
    (drip(1.0), 'failed', 4, 'model endpoint gave no complete answer within HTTP_TIMEOUT (0.5s)'),
    (endless(), 'failed', 1, 'model endpoint sent an answer larger than HTTP_MAX_BYTES (65536 bytes)'),
    (endless(500), 'failed', 1, 'model endpoint sent an answer larger than HTTP_MAX_BYTES (65536 bytes)'),
    (raw(b'[' * 50_000), 'failed', 1, 'model endpoint gave an answer nested too deeply to read'),
    (text(NESTED), 'failed', 1, 'model answer is nested too deeply to read'),
    (text('[x' * 30_000 + '["a", "b"]'), 'failed', 1, 'model answer holds no JSON list of tags'),
    (Reply(body=b'\x1f\x8b' + b'\0' * 64, headers={'Content-Encoding': 'gzip'}), 'failed', 1,
     'model endpoint sent an answer with Content-Encoding gzip, though asked for none'),
], ids=['drip', 'endless', 'endless-error-body', 'nested-answer', 'nested-content', 'many-brackets', 'gzip'])
def test_a_hostile_model_answer_ends_in_a_bounded_failure(model, use, reply, status, attempts, reason):
    use(http_timeout=0.5, http_max_bytes=65536)
    user = make_user(config=model_config(model))
    message = make_message(user, 'a note')
    model.default = reply
    state = run(whitenote_huey.auto_tag, user, message)
    assert (state.status, state.attempts) == (status, attempts)
    assert reason in state.last_error and tag_names(message.id) == []
    assert len(model.chat_requests()) == attempts


@pytest.mark.parametrize('kind, options, attempts, reason', [
    ('drip', {'seconds': 1.0}, 4, 'RAGFlow upload gave no complete answer within HTTP_TIMEOUT (0.5s)'),
    ('endless', {}, 1, 'RAGFlow upload sent an answer larger than HTTP_MAX_BYTES (65536 bytes)'),
    ('malformed', {'body': '[' * 50_000}, 1, 'RAGFlow upload: the answer is nested too deeply to read'),
], ids=['drip', 'endless', 'nested'])
def test_a_hostile_ragflow_answer_ends_in_a_bounded_failure(ragflow, use, kind, options, attempts, reason):
    use(http_timeout=0.5, http_max_bytes=65536)
    config = ragflow_config(ragflow)
    user = make_user(config=config)
    message = make_message(user, 'a note')
    ragflow.fail_next(kind, times=attempts, **options)
    state = run(whitenote_huey.sync_ragflow, user, message)
    assert (state.status, state.attempts) == ('failed', attempts)
    assert reason in state.last_error
    assert ragflow.count('POST', '/documents') == attempts


def test_a_listing_stops_at_ragflow_max_pages(ragflow, use):
    use(ragflow_max_pages=2)
    config = ragflow_config(ragflow)
    user = make_user(config=config)
    message = make_message(user, 'a note with very many copies')
    for _ in range(2 * whitenote_huey.RAGFLOW_PAGE_SIZE + 1):  # more than two pages of them
        ragflow.add_document(config['ragflow_dataset_id'], whitenote_huey.document_name(message.id), 'copy')
    state = run(whitenote_huey.sync_ragflow, user, message)
    assert (state.status, state.attempts) == ('failed', 1)
    assert 'more than RAGFLOW_MAX_PAGES (2) pages of documents' in state.last_error
    assert ragflow.count('GET', '/documents') == 2 and ragflow.count('DELETE') == 0


def peak_rss_kb(pid: int) -> int:
    """The process's peak resident memory (VmHWM) in kB, from /proc."""
    with open('/proc/%d/status' % pid) as handle:
        return int(re.search(r'^VmHWM:\s+(\d+) kB', handle.read(), re.MULTILINE).group(1))


@pytest.mark.parametrize('db', ['postgresql'], indirect=True)
def test_four_workers_hostile_endpoints_hold_no_other_users_job_back(db, redis_queue, model, ragflow, tmp_path):
    """A real consumer with four thread workers.  Users whose model or RAGFlow drips a byte
    a second (four of them: every worker is held), sends a body without end, answers with
    60 KB of "[" or with an error built to forge log lines: a normal user's auto-tag
    enqueued behind their jobs ends at most about one deadline later than it does alone,
    and the consumer's peak memory grows by far less than one endless answer would take
    in a deadline."""
    deadline, limit = 3, 256 * 1024
    env = dict(worker_env(db, redis=True), HTTP_TIMEOUT=str(deadline), HTTP_MAX_BYTES=str(limit))
    normal = make_user(config=dict(model_config(model), **ragflow_config(ragflow)))
    hostile = {}
    for name, reply in (('drip', drip(1.0)), ('drip2', drip(0.5)), ('endless', endless()), ('trap', text(NESTED)),
                        ('forger', error(400, 'bad\n2026-01-01 00:00:00,000 INFO [auto-tag] forged done\x1b[2J'))):
        fake = FakeModel(api_key='sk-%s-%s' % (name, secrets.token_hex(6))).start()
        fake.default = reply
        hostile[name] = (make_user(config=model_config(fake)), fake)
    for name, kind in (('ragflow-drip', 'drip'), ('ragflow-drip2', 'drip'), ('ragflow-endless', 'endless')):
        fake = FakeRagflow().start()
        fake.fail_next(kind, times=1000, seconds=1.0)
        hostile[name] = (make_user(config=ragflow_config(fake, enable_auto_tag=False)), fake)
    consumer = Consumer(env, str(tmp_path), '-w', '4', '-k', 'thread', '-d', '0.05', '-m', '0.5').start()
    try:
        def tagged(message) -> float:
            """Enqueue the normal user's auto-tag and sync now; seconds until the tags are there."""
            started = time.monotonic()
            whitenote_huey.enqueue_message_jobs(normal.id, message.id)
            wait_for(lambda: tag_names(message.id) == ['alpha', 'beta'], interval=0.05, what='the normal job')
            return time.monotonic() - started

        tagged(make_message(normal, 'warm-up: imports and connections'))
        alone = tagged(make_message(normal, 'alone'))
        rss_before = peak_rss_kb(consumer.process.pid)
        notes = {}
        for name, (user, _) in hostile.items():
            notes[name] = make_message(user, 'hostile %s' % name)
            task = whitenote_huey.sync_ragflow if name.startswith('ragflow') else whitenote_huey.auto_tag
            task(user.id, notes[name].id)
        beside = tagged(make_message(normal, 'beside the hostile ones'))

        def settled():
            states = {name: job_state('sync-ragflow' if name.startswith('ragflow') else 'auto-tag', note.id)
                      for name, note in notes.items()}
            return states if all(s is not None and s.status == 'failed' for s in states.values()) else None

        states = wait_for(settled, timeout=120, what='every hostile job to fail')
        rss_after = peak_rss_kb(consumer.process.pid)
        assert consumer.process.poll() is None
    finally:
        consumer.stop()
        for _, fake in hostile.values():
            fake.stop()
    # The bound: each hostile call ends by its deadline, so a worker is free within one
    # deadline; the margin (3 s more) absorbs the consumer's polling (0.05-0.5 s), this
    # test's polling (0.05 s) and CPU shared with other processes.  Unbounded, the drips
    # never end and the trap holds the interpreter for some 20 s a try.
    assert beside <= alone + deadline + 3, (alone, beside)
    # Two endless answers read for one deadline each would take hundreds of MB.
    assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
    reasons = {name: state.last_error for name, state in states.items()}
    for name in ('drip', 'drip2', 'ragflow-drip', 'ragflow-drip2'):
        assert 'no complete answer within HTTP_TIMEOUT (3s)' in reasons[name]
    assert 'larger than HTTP_MAX_BYTES (262144 bytes)' in reasons['endless']
    assert 'larger than HTTP_MAX_BYTES (262144 bytes)' in reasons['ragflow-endless']
    assert 'nested too deeply' in reasons['trap']
    # 8. The forged line stays inside the error, escaped, and the screen is not cleared.
    assert 'bad\\n2026-01-01 00:00:00,000 INFO [auto-tag] forged done\\x1b[2J' in reasons['forger']
    log = consumer.log()
    assert 'forged done\\x1b[2J' in log
    assert not [line for line in log.splitlines() if line.startswith('2026-01-01')]
    assert '\x1b' not in log


def test_a_size_limit_above_the_answer_lets_it_through(model, use):
    use(http_max_bytes=4096)
    user = make_user(config=model_config(model))
    message = make_message(user, 'a note')
    model.default = tags('small', 'answer')
    assert run(whitenote_huey.auto_tag, user, message).status == 'done'
    assert tag_names(message.id) == ['answer', 'small']


# 2. The URL that is checked is the URL that is called.

# Refused under either policy: the HTTP clients read them otherwise than the check would,
# or they carry what no base URL should.  {port} is the capture server's.
MALFORMED_URLS = [
    'http://127.0.0.1:{port}\\@8.8.8.8',  # urllib and httpx2 read 8.8.8.8, urllib3 127.0.0.1
    'http://127.0.0.1:{port}\\\\@1.1.1.1/',
    'http://%31%32%37.0.0.1:{port}',  # urllib3 decodes the host, urllib and httpx2 do not
    'http://8.8.8.8@127.0.0.1:{port}',  # credentials
    'http://user:hunter2-pw@127.0.0.1:{port}',
    'http://127.0.0.1:{port};@8.8.8.8',
    'http://127.0.0.1%2f@8.8.8.8:{port}',
    'http://127.0.0.1:{port}#@8.8.8.8',  # a fragment
    'http://127.0.0.1:{port}?@8.8.8.8',  # a query
    'http://127.0.0.1:{port} @8.8.8.8',  # white space
    'http://127.0.0.1:{port}\t@8.8.8.8',
    'http://127.0.0.1:{port}/\r\nHost: 8.8.8.8',  # control characters
    'http://127.0.0.1:{port}/\x01', 'http://127.0.0.1:{port}\x7f@8.8.8.8',
    'http://127.0.0.1\u200b:{port}',  # a zero-width space
    'http://１２７.０.０.１:{port}',  # fullwidth digits: the clients cannot read it
    'http:\\\\127.0.0.1:{port}',
]
# Refused under WHITENOTE_URL_POLICY=public: read alike, but loopback however written.
LOOPBACK_URLS = [
    'http://127.0.0.1:{port}', 'http://localhost:{port}', 'HTTP://LOCALHOST:{port}',
    'http://[::ffff:127.0.0.1]:{port}', 'http://[0:0:0:0:0:ffff:7f00:1]:{port}',
    'http://0x7f.0.0.1:{port}', 'http://2130706433:{port}', 'http://127.1:{port}',
    'http://017700000001:{port}', 'http://127.0.0.1:0{port}',
]


PROXY_SETTINGS = ('HTTP_PROXY', 'http_proxy', 'HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy',
                  'NO_PROXY', 'no_proxy')


@pytest.fixture
def direct(monkeypatch):
    """The capture server, with no proxy in the environment: connections go where the URL says."""
    for name in PROXY_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    with CaptureServer() as server:
        yield server


@pytest.fixture
def capture(direct, monkeypatch):
    """The capture server, and every proxy setting of both HTTP clients pointing at it."""
    for name in PROXY_SETTINGS[:6]:
        monkeypatch.setenv(name, direct.url)
    return direct


@pytest.mark.parametrize('form', MALFORMED_URLS + LOOPBACK_URLS)
@pytest.mark.parametrize('setting', ['openaiBaseUrl', 'ragflowBaseUrl'])
def test_hostile_url_forms_are_refused_before_any_connection(use, capture, ragflow, setting, form):
    url = form.format(port=capture.port)
    use(url_policy='public')
    with pytest.raises(PermanentError, match='AiConfig.%s ' % setting) as refused:
        whitenote_huey.checked_url(url, 'AiConfig.%s' % setting)
    assert 'hunter2' not in str(refused.value)
    if form in MALFORMED_URLS:
        use(url_policy='any')
        with pytest.raises(PermanentError):
            whitenote_huey.checked_url(url, 'AiConfig.%s' % setting)
        use(url_policy='public')
    # Refused by the check alone: now a job with it, which must fail before connecting.
    if setting == 'openaiBaseUrl':
        user = make_user(config={'openai_api_key': 'sk-url-%s' % secrets.token_hex(6), 'openai_base_url': url})
        state = run(whitenote_huey.auto_tag, user, make_message(user, 'where does this go'))
    else:
        user = make_user(config=dict(ragflow_config(ragflow), ragflow_base_url=url))
        state = run(whitenote_huey.sync_ragflow, user, make_message(user, 'where does this go'))
    # Failed once, not retried (auto-tag checks the URL once it holds the job, sync before).
    assert (state.status, state.attempts) == ('failed', 1 if setting == 'openaiBaseUrl' else 0)
    assert state.last_error.startswith('PermanentError: AiConfig.%s ' % setting)
    assert 'hunter2' not in state.last_error
    assert capture.connections == [] and ragflow.requests == []


def test_public_policy_checks_the_address_each_connection_goes_to(use, direct):
    """The second line: the address a connection is made to is checked again, so a name
    that resolves to a public address when the URL is checked and to an internal one a
    moment later (DNS rebinding) gets no further.  Here the URL check is left out, as if
    it had passed; "localhost" is the name that resolves inside."""
    use(url_policy='public')
    url = 'http://localhost:%d' % direct.port
    endpoint = whitenote_huey.ModelSettings(url, 'sk-rebind-%s' % secrets.token_hex(6), 'gpt',
                                            'AiConfig.openaiBaseUrl', 'localhost')
    with pytest.raises(PermanentError) as refused:
        whitenote_huey.ask_model(endpoint, [{'role': 'user', 'content': 'hi'}])
    assert str(refused.value) == ("AiConfig.openaiBaseUrl 'http://localhost:%d': localhost (127.0.0.1) is not "
                                  'a public address (loopback), refused by WHITENOTE_URL_POLICY=public'
                                  % direct.port)
    ragflow_endpoint = whitenote_huey.RagflowSettings(url, 'key', 'dataset', 'AiConfig.ragflowBaseUrl', 'localhost')
    with pytest.raises(PermanentError, match='refused by WHITENOTE_URL_POLICY=public'):
        whitenote_huey.ragflow_call(ragflow_endpoint, 'GET', 'documents', 'list')
    assert direct.connections == []
    # Under the policy "any" (no host to check) the same URL is called: the refusal was the check's.
    use(url_policy='any')
    with pytest.raises(whitenote_huey.TransientError):  # the capture server's {} has no choices
        whitenote_huey.ask_model(dataclasses.replace(endpoint, public_host=None), [{'role': 'user', 'content': 'hi'}])
    assert len(direct.connections) == 1


def test_the_operators_proxy_is_not_held_to_the_policy(use, capture):
    """A connection to the proxy (the operator's HTTP_PROXY, here the capture server on
    127.0.0.1) is not a connection to the user's host: it is made, and the proxy is asked
    for the public URL."""
    use(url_policy='public')
    # A key of this test's own: a client is made per endpoint and key, with the proxies of then.
    endpoint = whitenote_huey.ModelSettings('http://1.2.3.4', 'sk-proxied-%s' % secrets.token_hex(6), 'gpt',
                                            'AiConfig.openaiBaseUrl', '1.2.3.4')
    with pytest.raises(whitenote_huey.TransientError):  # the capture server's {} has no choices
        whitenote_huey.ask_model(endpoint, [{'role': 'user', 'content': 'hi'}])
    [(_, request)] = capture.connections
    assert request.startswith(b'POST http://1.2.3.4/v1/chat/completions ')


def test_one_users_refused_url_does_not_stop_the_sweep_for_everyone(use, ragflow):
    use(url_policy='public')
    hour_ago = models.utcnow() - datetime.timedelta(hours=1)
    refused = make_user(config=dict(ragflow_config(ragflow), ragflow_base_url='http://10.0.0.1:4154'))
    other = make_user(config=None)  # tags offline
    mine, theirs = make_message(refused, 'refused', hour_ago), make_message(other, 'offline #fine', hour_ago)
    counts = whitenote_huey.sweep()
    assert counts['enqueued'] == 2  # both auto-tags (the refused URL's sync follows its auto-tag)
    drain(whitenote_huey.huey)
    assert tag_names(theirs.id) == ['fine']
    state = job_state('sync-ragflow', mine.id)
    assert state.status == 'failed' and 'refused by WHITENOTE_URL_POLICY=public' in state.last_error
    assert ragflow.requests == []


# 3. Nothing is shared between users' calls.

def test_a_cookie_one_users_ragflow_sets_is_not_sent_with_another_users_requests(ragflow):
    alice, alice_ds = (lambda c: (make_user(config=c), c['ragflow_dataset_id']))(ragflow_config(ragflow))
    bob = make_user(config=ragflow_config(ragflow))
    ragflow.reply_headers = {'Set-Cookie': 'session=alice-only; Path=/'}
    assert run(whitenote_huey.sync_ragflow, alice, make_message(alice, 'alice')).status == 'done'
    alice_requests = list(ragflow.requests)
    ragflow.reset_requests()
    ragflow.reply_headers = {}
    # Same host, same thread (drain runs the jobs here), right after.
    assert run(whitenote_huey.sync_ragflow, bob, make_message(bob, 'bob')).status == 'done'
    bob_requests = list(ragflow.requests)
    assert len(alice_requests) >= 3 and len(bob_requests) >= 3
    assert all(r.dataset_id == alice_ds for r in alice_requests)
    assert [r for r in alice_requests + bob_requests if 'Cookie' in r.headers] == []
    # Each call has a connection of its own: none of Bob's went over one of Alice's.
    assert not {r.client for r in alice_requests} & {r.client for r in bob_requests}


def test_model_calls_carry_no_cookie_header_or_connection_of_another_user(model, monkeypatch):
    # What the openai SDK would add to every endpoint from the operator's environment.
    monkeypatch.setenv('OPENAI_ORG_ID', 'org-operator-secret')
    monkeypatch.setenv('OPENAI_PROJECT_ID', 'proj-operator-secret')
    monkeypatch.setenv('OPENAI_CUSTOM_HEADERS', 'X-Operator: operator-secret\nAuthorization: Bearer sk-operator')
    alice = make_user(config=dict(model_config(model), openai_api_key='sk-alice-%s' % secrets.token_hex(6)))
    bob = make_user(config=dict(model_config(model), openai_api_key='sk-bob-%s' % secrets.token_hex(6)))
    model.api_key = None  # both keys are taken
    model.default = Reply(content='["alpha"]', headers={'Set-Cookie': 'session=alice-only; Path=/'})
    for _ in range(2):
        assert run(whitenote_huey.auto_tag, alice, make_message(alice, 'alice')).status == 'done'
    model.default = tags('beta')
    for _ in range(2):
        assert run(whitenote_huey.auto_tag, bob, make_message(bob, 'bob')).status == 'done'
    requests = model.chat_requests()
    by_key = {}
    for request in requests:
        by_key.setdefault(request.headers['authorization'], []).append(request)
    alice_requests = by_key.pop('Bearer ' + models.AiConfig.for_user(alice.id).openai_api_key)
    bob_requests = by_key.pop('Bearer ' + models.AiConfig.for_user(bob.id).openai_api_key)
    assert by_key == {} and len(alice_requests) == len(bob_requests) == 2
    for request in requests:
        assert set(request.headers) <= {'host', 'content-type', 'content-length', 'accept',
                                         'accept-encoding', 'authorization', 'user-agent'}, request.headers
        assert 'operator-secret' not in json.dumps(request.headers)
    assert not {r.client for r in alice_requests} & {r.client for r in bob_requests}
    assert len({r.client for r in alice_requests}) == 1  # one user's calls do reuse a connection


# 8. Untrusted text is shown safely.

FORGED = 'ok\n2026-01-01 00:00:00 INFO forged line\x1b[2J\x1b]0;title\x07\u202eevil'


def test_show_status_and_briefing_print_untrusted_text_escaped(db, model, tmp_path):
    user = make_user(email='someone\x1b[2J@example.org', config=model_config(
        model, auto_tag_model='model\x1b[31m-name'))
    message = make_message(user, 'first line\n\x1b[2Jsecond line \u202e',
                           created_at=datetime.datetime(2026, 1, 1, 12))
    tagged = make_message(user, 'tag me please')
    model.default = lambda request: tags('fine') if 'tag me please' in request.prompt else error(400, FORGED)
    assert run(whitenote_huey.auto_tag, user, message).status == 'failed'
    assert run(whitenote_huey.auto_tag, user, tagged).status == 'done'
    env = worker_env(db, redis=bool(os.environ.get('REDIS_URL')))
    outputs = {name: cli(env, str(tmp_path), *args) for name, args in (
        ('show', ('show', message.id)), ('status', ('status',)), ('status --json', ('status', '--json')),
        ('briefing', ('briefing', '--user', user.id, '--date', '2026-01-02')))}
    for name, result in outputs.items():
        for stream in (result.stdout, result.stderr):
            assert not re.search('[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]', stream), (name, stream)
            assert not [line for line in stream.splitlines() if line.startswith('2026-01-01')], (name, stream)
    shown = outputs['show'].stdout.splitlines()
    assert shown[1:3] == ['  first line', '  \\x1b[2Jsecond line \\u202e']
    assert 'someone\\x1b[2J@example.org' in shown[0]
    assert 'ok\\n2026-01-01 00:00:00 INFO forged line\\x1b[2J\\x1b]0;title\\x07\\u202eevil' in outputs['show'].stdout
    assert 'forged line\\x1b[2J' in outputs['status'].stdout
    assert 'forged line\\x1b[2J' in outputs['briefing'].stdout
    assert '1 tag(s) by model model\\x1b[31m-name' in cli(env, str(tmp_path), 'show', tagged.id).stdout
    [failure] = json.loads(outputs['status --json'].stdout)['failures']
    assert failure['error'].endswith('ok\\n2026-01-01 00:00:00 INFO forged line\\x1b[2J\\x1b]0;title\\x07\\u202eevil')


def test_printable_escapes_what_acts_on_a_terminal_and_keeps_the_rest():
    printable = whitenote_huey.printable
    assert printable('a\nb\rc\td\x00e\x1b[2Jf\x7f\x85\x9b\u2028\u2029\u202e\u2066\ud800') == (
        'a\\nb\\rc\\td\\x00e\\x1b[2Jf\\x7f\\x85\\x9b\\u2028\\u2029\\u202e\\u2066\\ud800')
    assert printable('中文 éà 🎉 \u3000 👨\u200d👩\u200d👧 plain') == '中文 éà 🎉 \u3000 👨\u200d👩\u200d👧 plain'
