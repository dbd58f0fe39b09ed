"""The reconciling sweep on SQLite and PostgreSQL, in-process, on the real queue in Redis.

Time is injected where it matters: ``sweep(now=...)`` takes the clock, and a lease
running out is a row whose ``lease_until`` is in the past.
"""
import datetime

import pytest
from fake_model import error
from fake_model import tags
from services import cli
from services import drain
from services import job_state
from services import make_message
from services import make_user
from services import model_config
from services import ragflow_config
from services import tag_names
from services import worker_env
from test_sync_ragflow import own_docs

import models
import whitenote_huey
from models import JobState
from models import Message
from models import MessageVersion

pytestmark = pytest.mark.usefixtures('db', 'redis_queue')

LONG_AGO = models.utcnow() - datetime.timedelta(days=30)


def later(seconds: float) -> datetime.datetime:
    return models.utcnow() + datetime.timedelta(seconds=seconds)


def queued() -> list[tuple[str, tuple]]:
    """The jobs waiting in the queue: (task name, args)."""
    return sorted((task.name, task.args) for task in whitenote_huey.huey.pending())


def full_user(model, ragflow, **config):
    """A user with auto-tag on the fake model and a dataset on the fake RAGFlow."""
    settings = ragflow_config(ragflow, **model_config(model, **config))
    return make_user(config=settings), settings['ragflow_dataset_id']


def settled(user, *contents: str, created_at=LONG_AGO) -> list[Message]:
    """Messages whose jobs have all run (done), written long ago."""
    messages = [make_message(user, content, created_at) for content in contents]
    for message in messages:
        whitenote_huey.enqueue_message_jobs(user.id, message.id)
    drain(whitenote_huey.huey)
    return messages


def edit_in_sql(message, content: str) -> None:
    Message.update(content=content, updated_at=models.utcnow()).where(Message.id == message.id).execute()


# What the sweep finds.

def test_a_message_written_straight_in_sql_gets_its_jobs(model, ragflow):
    user, ds = full_user(model, ragflow)
    message = make_message(user, 'written by the web app', later(-60))
    counts = whitenote_huey.sweep()
    assert counts['recent'] == 1 and counts['enqueued'] == 1  # the sync follows auto-tag
    assert queued() == [('auto_tag', (user.id, message.id))]
    assert job_state('auto-tag', message.id).status == 'queued'
    drain(whitenote_huey.huey)
    assert tag_names(message.id) == ['alpha', 'beta']
    [doc] = own_docs(ragflow, ds, message.id)
    assert doc['content'] == '#alpha #beta\n\nwritten by the web app'
    assert job_state('sync-ragflow', message.id).status == 'done'
    assert whitenote_huey.sweep()['enqueued'] == 0  # nothing left to do
    assert queued() == []


def test_only_the_kinds_that_apply_and_not_within_the_grace(model, ragflow):
    tagging = make_user(config=model_config(model))
    nothing = make_user(config=model_config(model, enable_auto_tag=False))
    syncing = make_user(config=ragflow_config(ragflow, enable_auto_tag=False))
    created = later(-600)
    for user in (tagging, nothing, syncing):
        make_message(user, 'note', created)
    fresh = make_message(tagging, 'just written')
    assert whitenote_huey.sweep(now=created + datetime.timedelta(seconds=5))['enqueued'] == 0
    whitenote_huey.sweep()
    assert [(name, args[0]) for name, args in queued()] == sorted(
        [('auto_tag', tagging.id), ('sync_ragflow', syncing.id)])
    assert job_state('auto-tag', fresh.id) is None  # its direct enqueue gets the first turn


def test_an_edit_through_the_web_app_is_found_by_its_version_row(model, ragflow, use):
    user, ds = full_user(model, ragflow)
    [message] = settled(user, 'first text')
    use(sweep_scan_batch=1)
    whitenote_huey.move_cursor('messages', message.id)  # the rolling scan is elsewhere
    model.respond(tags('edited'))
    MessageVersion.create(message=message, content='first text', created_at=later(-30),
                          id=models.new_id())
    edit_in_sql(message, 'second text')
    counts = whitenote_huey.sweep(now=later(30))
    assert (counts['recent'], counts['changed']) == (1, 0)  # auto-tag; the sync follows it
    drain(whitenote_huey.huey)
    assert tag_names(message.id) == ['edited']
    assert [d['content'] for d in own_docs(ragflow, ds, message.id)] == ['#edited\n\nsecond text']


def test_the_rolling_scan_finds_edits_made_straight_in_sql(model, ragflow, use):
    user, ds = full_user(model, ragflow)
    messages = settled(user, *('note %d' % n for n in range(5)))
    model.default = tags('scanned')
    target = sorted(messages, key=lambda m: m.id)[3]
    edit_in_sql(target, 'changed in SQL')
    use(sweep_scan_batch=2)
    found = []
    for _ in range(4):  # 2 + 2 + 1 messages, then round again
        counts = whitenote_huey.sweep()
        found.append((counts['messages_scanned'], counts['changed']))
        drain(whitenote_huey.huey)
    assert found == [(2, 0), (2, 1), (1, 0), (2, 0)]  # auto-tag; the sync follows it
    assert tag_names(target.id) == ['scanned']
    assert [d['content'] for d in own_docs(ragflow, ds, target.id)] == ['#scanned\n\nchanged in SQL']
    assert all(job_state(kind, m.id).status == 'done' for m in messages
               for kind in ('auto-tag', 'sync-ragflow'))


def test_a_deleted_message_has_its_document_removed(model, ragflow, use):
    user, ds = full_user(model, ragflow)
    kept, deleted = settled(user, 'kept', 'deleted')
    Message.delete().where(Message.id == deleted.id).execute()
    counts = whitenote_huey.sweep()
    assert (counts['deleted'], counts['enqueued']) == (1, 1)
    assert queued() == [('sync_ragflow', (user.id, deleted.id))]
    drain(whitenote_huey.huey)
    assert own_docs(ragflow, ds, deleted.id) == [] and len(own_docs(ragflow, ds, kept.id)) == 1
    assert job_state('sync-ragflow', deleted.id).document_id is None
    assert whitenote_huey.sweep()['enqueued'] == 0


# Lost runs.

@pytest.mark.parametrize('status', ['running', 'retrying', 'queued', 'pending'])
def test_a_lost_run_is_enqueued_again_once_its_lease_has_run_out(model, status):
    user = make_user(config=model_config(model))
    [message] = settled(user, 'lost')
    lease = None if status == 'pending' else later(60)
    JobState.update(status=status, lease_until=lease, updated_at=models.utcnow()).where(
        JobState.message_id == message.id).execute()
    edit_in_sql(message, 'lost, and edited meanwhile')
    assert whitenote_huey.sweep()['enqueued'] == 0  # the run may still come
    now = later(61 if lease else whitenote_huey.settings.sweep_requeue + 1)
    counts = whitenote_huey.sweep(now=now)
    assert (counts['lost'], queued()) == (1, [('auto_tag', (user.id, message.id))])
    assert whitenote_huey.sweep(now=now)['enqueued'] == 0  # queued now, not twice


def test_two_sweeps_at_once_enqueue_a_job_once(model):
    user = make_user(config=model_config(model))
    message = make_message(user, 'raced', LONG_AGO)
    first, second = (whitenote_huey.Sweep(models.utcnow(), 10) for _ in range(2))
    [job] = first.due_jobs([message])[message.id]
    assert second.due_jobs([message])[message.id] == [job]  # both read no state
    assert first.enqueue(job) and not second.enqueue(job)
    whitenote_huey.auto_tag.call_local(user.id, message.id)
    state = job_state('auto-tag', message.id)
    job = whitenote_huey.DueJob('auto-tag', message.id, user.id, state)
    edit_in_sql(message, 'raced again')
    third, fourth = (whitenote_huey.Sweep(models.utcnow(), 10) for _ in range(2))
    assert third.enqueue(job) and not fourth.enqueue(job)  # both read the done state
    assert queued() == [('auto_tag', (user.id, message.id))] * 2


def test_a_retry_holds_the_row_until_it_is_due(model):
    user = make_user(config=model_config(model))
    message = make_message(user, 'flaky', LONG_AGO)
    model.respond(error(503))
    whitenote_huey.auto_tag(user.id, message.id)
    huey = whitenote_huey.huey
    huey.execute(huey.dequeue())
    state = job_state('auto-tag', message.id)
    assert state.status == 'retrying'
    assert state.lease_until >= state.updated_at + datetime.timedelta(
        seconds=whitenote_huey.RETRY_DELAY + whitenote_huey.settings.sweep_requeue)
    assert whitenote_huey.sweep()['enqueued'] == 0
    huey.flush()  # the retry is lost with the queue
    counts = whitenote_huey.sweep(now=state.lease_until + datetime.timedelta(seconds=1))
    assert counts['lost'] == 1
    drain(huey)
    assert job_state('auto-tag', message.id).status == 'done'


def test_a_failure_stays_failed_until_the_content_changes(model):
    user = make_user(config=model_config(model))
    message = make_message(user, 'bad key', LONG_AGO)
    model.respond(error(401, 'Incorrect API key provided.'))
    whitenote_huey.enqueue_message_jobs(user.id, message.id)
    drain(whitenote_huey.huey)
    assert job_state('auto-tag', message.id).status == 'failed'
    for _ in range(3):
        assert whitenote_huey.sweep(now=later(3600))['enqueued'] == 0
    edit_in_sql(message, 'bad key, edited')
    assert whitenote_huey.sweep()['changed'] == 1
    drain(whitenote_huey.huey)
    assert job_state('auto-tag', message.id).status == 'done'
    assert len(model.chat_requests()) == 2


# Bounded.

def test_a_pass_enqueues_at_most_the_limit_less_what_the_queue_holds(model, ragflow):
    user = make_user(config=model_config(model))
    messages = [make_message(user, 'backlog %d' % n, LONG_AGO) for n in range(25)]
    other = make_user(config=model_config(model))
    whitenote_huey.auto_tag(other.id, make_message(other, 'waiting').id)  # one job queued
    assert whitenote_huey.sweep(limit=10)['enqueued'] == 9
    assert whitenote_huey.sweep(limit=10)['enqueued'] == 0  # the queue holds 10
    passes = 1
    while whitenote_huey.huey.pending_count():
        drain(whitenote_huey.huey)
        passes += whitenote_huey.sweep(limit=10)['enqueued'] > 0
    assert passes == 3  # 9 + 10 + 6
    assert all(job_state('auto-tag', m.id).status == 'done' for m in messages)
    assert len(model.chat_requests()) == 26


def test_a_slice_cut_short_by_the_limit_goes_on_where_it_stopped(model, use):
    user = make_user(config=model_config(model))
    messages = [make_message(user, 'old %d' % n, LONG_AGO) for n in range(12)]
    use(sweep_scan_batch=6)
    found = []
    for _ in range(3):  # 4 of the first 6, 4 of the 6 from there, the last 4
        found.append(whitenote_huey.sweep(limit=4)['changed'])
        drain(whitenote_huey.huey)
    assert found == [4, 4, 4]
    assert [job_state('auto-tag', m.id).status for m in messages] == ['done'] * 12


# Entry points.

def test_sweep_command_prints_the_counts_and_enqueues(db, model, tmp_path):
    user = make_user(config=model_config(model, enable_briefing=False))
    message = make_message(user, 'for the command', later(-60))
    env = worker_env(db, redis=True)
    result = cli(env, str(tmp_path), 'sweep')
    assert result.returncode == 0, result.stderr
    assert 'enqueued 1, lost 0, recent 1' in result.stdout
    assert queued() == [('auto_tag', (user.id, message.id))]
    assert models.WorkerRun.get_by_id('sweep').outcome == 'done'  # for status
    down = cli(dict(env, REDIS_URL='redis://127.0.0.1:1/0'), str(tmp_path), 'sweep')
    assert down.returncode == 3 and 'the queue at REDIS_URL' in down.stderr
    assert models.WorkerRun.get_by_id('sweep').outcome == 'failed'


def test_the_periodic_sweep_runs_every_sweep_minutes():
    periodic = {task.name for task in whitenote_huey.huey._registry.periodic_tasks}
    assert {'periodic_sweep', 'schedule_briefings'} <= periodic
    every_five = whitenote_huey.every_minutes(5)
    minutes = [datetime.datetime(2026, 1, 1, 10, 0) + datetime.timedelta(minutes=n) for n in range(11)]
    assert [m.minute for m in minutes if every_five(m)] == [0, 5, 10]
    assert all(whitenote_huey.every_minutes(1)(m) for m in minutes)


def test_sweep_settings_are_read_and_checked():
    defaults = whitenote_huey.load_settings({})
    assert (defaults.sweep_minutes, defaults.sweep_lookback, defaults.sweep_grace,
            defaults.sweep_requeue, defaults.sweep_max_enqueue, defaults.sweep_scan_batch) == (
        1, 86400.0, None, 300.0, 500, 5000)
    assert whitenote_huey.sweep_grace() == 10.0  # unset, beside a WhiteNote whose jobs come to the worker
    assert whitenote_huey.load_settings({'SWEEP_GRACE_SECONDS': '2.5'}).sweep_grace == 2.5
    loaded = whitenote_huey.load_settings({'SWEEP_MINUTES': '5', 'SWEEP_LOOKBACK_HOURS': '2',
                                           'SWEEP_REQUEUE_SECONDS': '30'})
    assert (loaded.sweep_minutes, loaded.sweep_lookback, loaded.sweep_requeue) == (5, 7200.0, 30.0)
    for name, bad in (('SWEEP_MINUTES', '1.5'), ('SWEEP_MAX_ENQUEUE', '0'),
                      ('SWEEP_SCAN_BATCH', 'many'), ('SWEEP_GRACE_SECONDS', '-1')):
        with pytest.raises(whitenote_huey.SettingsError, match=name):
            whitenote_huey.load_settings({name: bad})


def test_enqueue_message_jobs_writes_nothing(model, ragflow):
    user, _ = full_user(model, ragflow)
    message = make_message(user, 'hot path')
    assert whitenote_huey.enqueue_message_jobs(user.id, message.id) == ['auto-tag', 'sync-ragflow']
    assert JobState.select().count() == 0
