"""sync-ragflow on SQLite and PostgreSQL, through the real Huey queue on Redis, against a
fake RAGFlow over real HTTP (tests/fake_ragflow.py)."""
import dataclasses
import datetime
import re

import pytest
from services import Consumer
from services import cli
from services import drain
from services import job_state
from services import make_message
from services import make_user
from services import ragflow_config
from services import wait_for
from services import worker_env

import models
import whitenote_huey

pytestmark = pytest.mark.usefixtures('db', 'redis_queue')


def rag_user(fake, **extra):
    """A user with a dataset of their own on ``fake``: (user, dataset id, api key)."""
    config = ragflow_config(fake, **extra)
    return make_user(config=config), config['ragflow_dataset_id'], config['ragflow_api_key']


def run_sync(user_id: str, message_id: str) -> int:
    whitenote_huey.sync_ragflow(user_id, message_id)
    return drain(whitenote_huey.huey)


def own_docs(fake, dataset_id: str, message_id: str) -> list[dict]:
    name = re.compile(r'message_%s(\(\d+\))?\.md' % re.escape(message_id))
    return [doc for doc in fake.documents(dataset_id) if name.fullmatch(doc['name'])]


def calls(fake) -> list[tuple[str, str]]:
    """The requests as (method, last path segment): ('POST', 'documents'), ..."""
    return [(r.method, r.path.rstrip('/').rsplit('/', 1)[-1]) for r in fake.requests]


def edit(message, content: str) -> None:
    models.Message.update(content=content).where(models.Message.id == message.id).execute()


def fast_timeout(monkeypatch, seconds: float = 0.3) -> None:
    monkeypatch.setattr(whitenote_huey, 'settings', dataclasses.replace(
        whitenote_huey.settings, http_timeout=seconds))


def retry_delays(caplog) -> list[float]:
    return [float(m.group(1)) for r in caplog.records
            for m in [re.search(r'will retry in ([\d.]+)s', r.getMessage())] if m]


# What a sync makes.

def test_first_sync_uploads_one_document_and_starts_parsing(ragflow):
    user, ds, key = rag_user(ragflow)
    message = make_message(user, 'Hello **RAGFlow**')
    run_sync(user.id, message.id)
    [doc] = ragflow.documents(ds)
    assert (doc['name'], doc['content']) == ('message_%s.md' % message.id, 'Hello **RAGFlow**')
    assert doc['run'] != 'UNSTART'
    state = job_state('sync-ragflow', message.id)
    assert (state.status, state.document_id, state.dataset_id, state.last_error) == (
        'done', doc['id'], ds, None)
    assert state.content_hash == whitenote_huey.content_hash('Hello **RAGFlow**', ds)
    assert calls(ragflow) == [('POST', 'documents'), ('GET', 'documents'), ('POST', 'chunks')]
    upload, listing, parse = ragflow.requests
    assert listing.query['keywords'] == 'message_%s' % message.id
    assert upload.files == [('message_%s.md' % message.id, b'Hello **RAGFlow**')]
    assert upload.headers['Content-Type'].startswith('multipart/form-data')
    assert parse.json == {'document_ids': [doc['id']]}
    assert {r.headers['Authorization'] for r in ragflow.requests} == {'Bearer ' + key}


@pytest.mark.parametrize('tags, expected', [
    ([], 'the body'),
    (['zeta', 'Alpha', '读书'], '#Alpha #zeta #读书\n\nthe body'),
])
def test_document_has_a_tag_line_only_when_the_message_has_tags(ragflow, tags, expected):
    user, ds, _ = rag_user(ragflow)
    message = make_message(user, 'the body')
    for name in tags:
        models.MessageTag.create(message=message, tag=models.Tag.upsert(name))
    run_sync(user.id, message.id)
    assert [doc['content'] for doc in ragflow.documents(ds)] == [expected]


def test_unchanged_message_makes_no_write_request(ragflow):
    user, ds, _ = rag_user(ragflow)
    message = make_message(user, 'same text')
    run_sync(user.id, message.id)
    [before] = ragflow.documents(ds)
    ragflow.reset_requests()
    run_sync(user.id, message.id)
    run_sync(user.id, message.id)
    assert {method for method, _ in calls(ragflow)} == {'GET'}
    assert [doc['id'] for doc in ragflow.documents(ds)] == [before['id']]
    assert job_state('sync-ragflow', message.id).status == 'done'


def test_edit_uploads_before_deleting_and_ends_with_one_document(ragflow):
    user, ds, _ = rag_user(ragflow)
    message = make_message(user, 'first version')
    run_sync(user.id, message.id)
    [old] = ragflow.documents(ds)
    edit(message, 'second version')
    ragflow.reset_requests()
    run_sync(user.id, message.id)
    [new] = ragflow.documents(ds)
    assert new['content'] == 'second version' and new['id'] != old['id']
    assert calls(ragflow) == [('POST', 'documents'), ('GET', 'documents'),
                              ('DELETE', 'documents'), ('PUT', new['id']), ('POST', 'chunks')]
    assert ragflow.requests[2].json == {'ids': [old['id']]}
    # RAGFlow named the upload "(1)" while the old copy held the plain name; once that
    # copy is gone the document takes the plain name back.
    assert ragflow.requests[3].json == {'name': 'message_%s.md' % message.id}
    assert ragflow.requests[4].json == {'document_ids': [new['id']]}
    assert job_state('sync-ragflow', message.id).document_id == new['id']
    assert new['name'] == 'message_%s.md' % message.id
    edit(message, 'third version')
    run_sync(user.id, message.id)
    assert [(d['name'], d['content']) for d in ragflow.documents(ds)] == [
        ('message_%s.md' % message.id, 'third version')]


def test_a_tag_change_alone_resyncs(ragflow):
    user, ds, _ = rag_user(ragflow)
    message = make_message(user, 'tagged later')
    run_sync(user.id, message.id)
    models.MessageTag.create(message=message, tag=models.Tag.upsert('later'))
    run_sync(user.id, message.id)
    assert [doc['content'] for doc in ragflow.documents(ds)] == ['#later\n\ntagged later']


def test_stray_copies_are_removed_and_other_names_kept(ragflow):
    user, ds, _ = rag_user(ragflow)
    message = make_message(user, 'current')
    name = 'message_%s.md' % message.id
    strays = [ragflow.add_document(ds, name, 'stray %d' % i)['id'] for i in range(3)]
    others = ['message_%s7.md' % message.id, 'message_%s(1)x.md' % message.id,
              'message_%s.txt' % message.id, 'notes.md']
    for other in others:
        ragflow.add_document(ds, other, 'not this message')
    run_sync(user.id, message.id)
    assert [d['content'] for d in own_docs(ragflow, ds, message.id)] == ['current']
    assert sorted(d['name'] for d in ragflow.documents(ds)
                  if d['content'] == 'not this message') == sorted(others)
    [delete] = [r for r in ragflow.requests if r.method == 'DELETE']
    assert sorted(delete.json['ids']) == sorted(strays)


def test_more_copies_than_a_page_are_all_removed(ragflow):
    user, ds, _ = rag_user(ragflow)
    message = make_message(user, 'many strays')
    for _ in range(whitenote_huey.RAGFLOW_PAGE_SIZE + 5):
        ragflow.add_document(ds, 'message_%s.md' % message.id, 'stray')
    run_sync(user.id, message.id)
    assert [d['content'] for d in ragflow.documents(ds)] == ['many strays']
    assert ragflow.count('GET') == 2


def test_stray_found_by_an_unchanged_run_is_removed_without_uploading(ragflow):
    user, ds, _ = rag_user(ragflow)
    message = make_message(user, 'kept')
    run_sync(user.id, message.id)
    [kept] = ragflow.documents(ds)
    ragflow.add_document(ds, 'message_%s.md' % message.id, 'late copy')
    ragflow.reset_requests()
    run_sync(user.id, message.id)
    assert [d['id'] for d in ragflow.documents(ds)] == [kept['id']]
    assert calls(ragflow) == [('GET', 'documents'), ('DELETE', 'documents')]


def test_lost_upload_answer_is_retried_and_ends_with_one_document(ragflow):
    user, ds, _ = rag_user(ragflow)
    message = make_message(user, 'v1')
    run_sync(user.id, message.id)
    edit(message, 'v2')
    ragflow.fail_next('drop_after_store', method='POST', path_contains='/documents')
    run_sync(user.id, message.id)
    assert [d['content'] for d in ragflow.documents(ds)] == ['v2']
    assert ragflow.count('POST', '/documents') == 3
    state = job_state('sync-ragflow', message.id)
    assert (state.status, state.attempts) == ('done', 3)
    assert state.document_id == ragflow.documents(ds)[0]['id']


def test_deleted_message_loses_all_its_documents(ragflow):
    user, ds, _ = rag_user(ragflow)
    message = make_message(user, 'soon gone')
    run_sync(user.id, message.id)
    ragflow.add_document(ds, 'message_%s.md' % message.id, 'stray')
    ragflow.add_document(ds, 'notes.md', 'someone else')
    message.delete_instance()
    run_sync(user.id, message.id)
    assert [d['name'] for d in ragflow.documents(ds)] == ['notes.md']
    state = job_state('sync-ragflow', message.id)
    assert (state.status, state.document_id) == ('done', None)
    assert 'deleted, 2 document(s) removed' in state.detail
    ragflow.reset_requests()
    run_sync(user.id, message.id)
    assert calls(ragflow) == [('GET', 'documents')]


def test_deleted_message_with_no_document_sends_no_delete(ragflow):
    """RAGFlow up to v0.24 deletes every document of a dataset on an empty id list."""
    user, ds, _ = rag_user(ragflow)
    ragflow.add_document(ds, 'notes.md', 'must survive')
    message = make_message(user, 'never synced')
    message.delete_instance()
    run_sync(user.id, message.id)
    assert [d['name'] for d in ragflow.documents(ds)] == ['notes.md']
    assert ragflow.count('DELETE') == 0
    assert job_state('sync-ragflow', message.id).status == 'done'


# RAGFlow's errors.

@pytest.mark.parametrize('failure', ['wrong-key', 'http401', 'data_false'])
def test_refusals_are_permanent_and_keep_the_key_secret(ragflow, caplog, failure):
    user, ds, key = rag_user(ragflow)
    if failure == 'wrong-key':
        key = 'ragflow-wrong-key-123456'
        models.AiConfig.update(ragflow_api_key=key).where(models.AiConfig.user == user).execute()
    else:
        ragflow.fail_next(failure)
    message = make_message(user, 'refused')
    run_sync(user.id, message.id)
    state = job_state('sync-ragflow', message.id)
    assert (state.status, state.attempts) == ('failed', 1)
    assert len(ragflow.requests) == 1 and ragflow.documents(ds) == []
    expected = {'wrong-key': 'authentication error (code 109)',
                'http401': 'HTTP 401, the API key was refused', 'data_false': 'refused'}[failure]
    assert expected in state.last_error
    assert key not in state.last_error + caplog.text


@pytest.mark.parametrize('kind, options', [
    ('http500', {}), ('http502', {}), ('busy', {}), ('malformed', {}), ('drop', {}),
    ('retry_after', {'status': 503, 'seconds': 1}), ('slow', {'seconds': 0.6}),
])
def test_transient_failures_retry_with_backoff_then_fail(ragflow, caplog, monkeypatch, kind, options):
    fast_timeout(monkeypatch)
    user, ds, key = rag_user(ragflow)
    message = make_message(user, 'unlucky')
    ragflow.fail_next(kind, times=4, **options)
    run_sync(user.id, message.id)
    state = job_state('sync-ragflow', message.id)
    assert (state.status, state.attempts) == ('failed', 4)
    assert ragflow.count('POST', '/documents') == 4 and len(ragflow.requests) == 4
    delays = retry_delays(caplog)
    assert len(delays) == 3 and delays[0] < delays[1] < delays[2]
    assert key not in state.last_error + caplog.text


def test_transient_failure_then_success_ends_with_one_document(ragflow):
    user, ds, _ = rag_user(ragflow)
    message = make_message(user, 'second time lucky')
    ragflow.fail_next('http500', times=2)
    run_sync(user.id, message.id)
    assert [d['content'] for d in ragflow.documents(ds)] == ['second time lucky']
    state = job_state('sync-ragflow', message.id)
    assert (state.status, state.attempts, state.last_error) == ('done', 3, None)


def test_retry_after_is_honoured(ragflow, caplog):
    user, ds, _ = rag_user(ragflow)
    message = make_message(user, 'rate limited')
    ragflow.fail_next('retry_after', seconds=7)
    run_sync(user.id, message.id)
    assert retry_delays(caplog) == [7.0]
    assert job_state('sync-ragflow', message.id).status == 'done'


@pytest.mark.parametrize('method, path', [
    ('POST', '/documents'), ('GET', '/documents'), ('DELETE', '/documents'), ('POST', '/chunks')])
def test_a_timeout_at_any_step_is_retried(ragflow, monkeypatch, method, path):
    fast_timeout(monkeypatch)
    user, ds, _ = rag_user(ragflow)
    message = make_message(user, 'v1')
    run_sync(user.id, message.id)
    edit(message, 'v2')
    ragflow.fail_next('slow', method=method, path_contains=path, seconds=0.8)
    run_sync(user.id, message.id)
    state = job_state('sync-ragflow', message.id)
    assert (state.status, state.attempts) == ('done', 3)
    assert state.document_id in [d['id'] for d in ragflow.documents(ds)]
    if (method, path) == ('POST', '/documents'):
        # The upload that timed out is stored late; the next run removes it, uploading nothing.
        wait_for(lambda: len(ragflow.documents(ds)) == 2, what='the late upload')
        ragflow.reset_requests()
        run_sync(user.id, message.id)
        assert ragflow.count('POST') == 0
    assert [d['content'] for d in ragflow.documents(ds)] == ['v2']


# Settings.

@pytest.mark.parametrize('source', ['user', 'environment', 'incomplete-user', 'none'])
def test_settings_from_ai_config_else_environment_else_skipped(ragflow, monkeypatch, source):
    env_key = 'ragflow-env-key-0001'
    env_ds = ragflow.add_dataset(env_key)
    if source != 'none':
        monkeypatch.setattr(whitenote_huey, 'settings', dataclasses.replace(
            whitenote_huey.settings, ragflow_base_url=ragflow.url, ragflow_api_key=env_key,
            ragflow_dataset_id=env_ds))
    user_ds = None
    if source == 'user':
        user, user_ds, _ = rag_user(ragflow)
    elif source == 'incomplete-user':
        user = make_user(config={'ragflow_api_key': 'ragflow-key-no-dataset'})
    else:
        user = make_user(config=None)
    message = make_message(user, 'where does it go')
    run_sync(user.id, message.id)
    state = job_state('sync-ragflow', message.id)
    if source == 'none':
        assert (state.status, state.last_error) == ('skipped', None)
        assert ragflow.requests == []
        return
    target = user_ds or env_ds
    assert [d['content'] for d in ragflow.documents(target)] == ['where does it go']
    assert {r.dataset_id for r in ragflow.requests} == {target}
    assert (state.status, state.dataset_id) == ('done', target)


def test_load_settings_reads_ragflow_settings():
    env = {'RAGFLOW_BASE_URL': 'https://rag.example.org', 'RAGFLOW_API_KEY': 'ragflow-secret',
           'RAGFLOW_DATASET_ID': 'ds1'}
    loaded = whitenote_huey.load_settings(env)
    assert (loaded.ragflow_base_url, loaded.ragflow_api_key, loaded.ragflow_dataset_id) == (
        'https://rag.example.org', 'ragflow-secret', 'ds1')
    assert 'ragflow-secret' not in repr(loaded)
    defaults = whitenote_huey.load_settings({})
    assert (defaults.ragflow_base_url, defaults.ragflow_api_key) == ('http://localhost:4154', '')
    for bad, named in [({'RAGFLOW_BASE_URL': 'ftp://rag'}, 'RAGFLOW_BASE_URL'),
                       ({'RAGFLOW_DATASET_ID': 'd'}, 'RAGFLOW_API_KEY')]:
        with pytest.raises(whitenote_huey.SettingsError, match=named):
            whitenote_huey.load_settings(bad)
    # The web app's .env may name a key alone (it seeds new users' settings with it):
    # accepted, and with no dataset it makes no environment's dataset.
    key_alone = whitenote_huey.load_settings({'RAGFLOW_API_KEY': 'k'})
    assert (key_alone.ragflow_api_key, key_alone.ragflow_dataset_id) == ('k', '')


# Triggers.

def test_enqueue_message_jobs_adds_the_sync_when_ragflow_is_configured(ragflow):
    both = rag_user(ragflow)[0]
    sync_only = rag_user(ragflow, enable_auto_tag=False)[0]
    neither = make_user(config={})
    jobs = whitenote_huey.enqueue_message_jobs
    assert jobs(both.id, make_message(both, 'a').id) == ['auto-tag', 'sync-ragflow']
    assert jobs(sync_only.id, make_message(sync_only, 'b').id) == ['sync-ragflow']
    assert jobs(neither.id, make_message(neither, 'c').id) == ['auto-tag']
    # auto-tag enqueues the sync when it ends, so a note with both is uploaded once, tagged.
    assert len(whitenote_huey.huey) == 3
    assert drain(whitenote_huey.huey) == 4
    assert len([r for r in ragflow.requests if r.files]) == 2


def test_auto_tag_changing_the_tags_syncs_the_tags(ragflow):
    user, ds, _ = rag_user(ragflow)
    message = make_message(user, 'Trip notes #travel')
    run_sync(user.id, message.id)
    assert [d['content'] for d in ragflow.documents(ds)] == ['Trip notes #travel']
    whitenote_huey.auto_tag(user.id, message.id)
    assert drain(whitenote_huey.huey) == 2
    assert [d['content'] for d in ragflow.documents(ds)] == ['#travel\n\nTrip notes #travel']
    # An edit that leaves the tags as they were: the sync follows auto-tag all the same,
    # since it is the edit's only way to RAGFlow.
    edit(message, 'More trip notes #travel')
    whitenote_huey.auto_tag(user.id, message.id)
    assert drain(whitenote_huey.huey) == 2
    assert [d['content'] for d in ragflow.documents(ds)] == ['#travel\n\nMore trip notes #travel']
    # Nor does a tag change for a user without RAGFlow.
    other = make_user(config={})
    whitenote_huey.auto_tag(other.id, make_message(other, 'plain #cooking').id)
    assert drain(whitenote_huey.huey) == 1


# Isolation and concurrency.

def test_two_users_documents_stay_in_their_own_datasets(ragflow):
    alice, alice_ds, alice_key = rag_user(ragflow)
    bob, bob_ds, bob_key = rag_user(ragflow)
    mine, theirs = make_message(alice, 'alice note'), make_message(bob, 'bob note')
    whitenote_huey.sync_ragflow(alice.id, mine.id)
    whitenote_huey.sync_ragflow(bob.id, theirs.id)
    drain(whitenote_huey.huey)
    bob_gone = make_message(bob, 'bob deletes this')
    run_sync(bob.id, bob_gone.id)
    bob_gone.delete_instance()
    run_sync(bob.id, bob_gone.id)
    assert [d['content'] for d in ragflow.documents(alice_ds)] == ['alice note']
    assert [d['content'] for d in ragflow.documents(bob_ds)] == ['bob note']
    keys = {alice_ds: 'Bearer ' + alice_key, bob_ds: 'Bearer ' + bob_key}
    assert {r.dataset_id for r in ragflow.requests} == {alice_ds, bob_ds}
    assert all(r.headers['Authorization'] == keys[r.dataset_id] for r in ragflow.requests)


def test_a_run_waits_while_another_holds_the_message(ragflow):
    user, ds, _ = rag_user(ragflow)
    message = make_message(user, 'v1')
    run_sync(user.id, message.id)
    held = models.utcnow() + datetime.timedelta(seconds=60)
    (models.JobState
     .update(status='running', lease_until=held)
     .where(models.JobState.message_id == message.id)
     .execute())
    edit(message, 'v2')
    ragflow.reset_requests()
    huey = whitenote_huey.huey
    whitenote_huey.sync_ragflow(user.id, message.id)
    huey.execute(huey.dequeue())
    assert ragflow.requests == []
    [deferred] = huey.pending()
    assert (deferred.name, deferred.args) == ('sync_ragflow', (user.id, message.id))
    assert deferred.eta is not None
    assert job_state('sync-ragflow', message.id).status == 'running'
    # The holder died: its lease runs out and the deferred run does the work.
    models.JobState.update(lease_until=models.utcnow() - datetime.timedelta(seconds=1)).execute()
    drain(huey)
    assert [d['content'] for d in ragflow.documents(ds)] == ['v2']
    assert job_state('sync-ragflow', message.id).status == 'done'


# End to end.

def test_sync_runs_on_the_real_consumer(db, ragflow, tmp_path):
    user, ds, key = rag_user(ragflow)
    message = make_message(user, 'through the consumer')
    env = worker_env(db, redis=True)
    consumer = Consumer(env, str(tmp_path)).start()
    try:
        result = cli(env, str(tmp_path), 'enqueue', 'sync-ragflow', message.id)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: [d['content'] for d in ragflow.documents(ds)] == ['through the consumer'],
                 what='the document from the consumer')
        wait_for(lambda: job_state('sync-ragflow', message.id).status == 'done', what='done')
        edit(message, 'edited, through the consumer')
        whitenote_huey.sync_ragflow(user.id, message.id)
        wait_for(lambda: [d['content'] for d in ragflow.documents(ds)]
                 == ['edited, through the consumer'], what='the edited document')
        wait_for(lambda: job_state('sync-ragflow', message.id).status == 'done', what='done again')
    finally:
        consumer.stop()
    assert '[sync-ragflow] %s done' % message.id in consumer.log()
    assert key not in consumer.log()
