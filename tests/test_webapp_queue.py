"""The web app's own jobs: enqueued with its BullMQ client (npm bullmq@5) exactly as its
``addTask`` does, taken by the real consumer, on a redis-server of the test's own.

"Done" is read on the database; what BullMQ keeps is read with the web app's client.
"""
import datetime
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from fake_model import tags
from services import ROOT
from services import Consumer
from services import WebAppQueue
from services import cli
from services import job_state
from services import make_message
from services import make_user
from services import make_workspace
from services import make_ws_message
from services import tag_names
from services import wait_for
from test_crash import POSTGRESQL_ONLY
from test_crash import crash_env  # noqa: F401 - fixtures
from test_crash import people
from test_crash import redis_server  # noqa: F401
from test_crash import start_consumer  # noqa: F401
from test_crash import unfinished
from test_crash import wait_until_done
from test_crash import write
from test_workspaces import comment_tags
from test_workspaces import owner

import whitenote_huey
from models import Briefing
from models import Comment
from models import JobState
from models import Message

NOT_HANDLED = ('sync-to-local', 'create-message-from-file', 'create-workspace-from-folder')


@pytest.fixture
def webapp(redis_server):  # noqa: F811
    """The web app's queue (BULLMQ_QUEUE) on this test's Redis."""
    return WebAppQueue(redis_server.url, os.environ['BULLMQ_QUEUE'])


def no_sweep(env: dict) -> dict:
    """Settings under which the sweep leaves new messages alone: what is done, the taker did."""
    return dict(env, SWEEP_GRACE_SECONDS='3600')


def settled(webapp: WebAppQueue) -> dict:
    wait_for(webapp.settled, timeout=60, interval=0.3, what="the web app's queue to empty")
    return webapp.counts()


def add_apart(webapp: WebAppQueue, *jobs: tuple[str, object]) -> list[str]:
    """addTask for each job in its own millisecond: ``${type}-${Date.now()}`` ids of one
    type in the same millisecond collide, and BullMQ keeps only the first."""
    ids = []
    for job in jobs:
        ids += webapp.add(job)
    assert len(set(ids)) == len(ids)
    return ids


def test_the_web_apps_jobs_become_their_tasks(db, crash_env, start_consumer, webapp, model,  # noqa: F811
                                                ragflow):
    datasets = people(model, ragflow, count=1)
    user_id = next(iter(datasets))
    consumer = start_consumer('-w', '2', env=no_sweep(crash_env))
    note, other = write(datasets, 2)
    # As the web app of stage 7 enqueues a new note's jobs, both, side by side; and one
    # alone, with workspaceId and contentType of later versions.
    add_apart(webapp, ('auto-tag', {'userId': user_id, 'messageId': note.id}),
              ('sync-ragflow', {'userId': user_id, 'messageId': note.id}),
              ('sync-ragflow', {'userId': user_id, 'messageId': other.id, 'workspaceId': 'ws1',
                                'contentType': 'message'}))
    wait_until_done([note, other], datasets, ragflow)  # tags, then the document with them
    counts = settled(webapp)
    assert (counts['completed'], counts['failed'], counts['delayed']) == (3, 0, 0)
    consumer.stop()
    # Each note reached RAGFlow once, after tagging: one upload each, not one before the tags.
    assert ragflow.count('POST', '/documents') == 2
    assert len(ragflow.documents(datasets[user_id])) == 2
    log = consumer.log()
    assert '[bullmq] job auto-tag-' in log
    assert 'enqueued auto-tag, sync-ragflow for message %s' % note.id in log


@POSTGRESQL_ONLY
def test_a_thousand_enqueues_leave_nothing_waiting(db, crash_env, start_consumer, webapp, tmp_path):  # noqa: F811
    """What BullMQ keeps stays within the web app's removeOnComplete 100 and removeOnFail 50;
    a job dropped because its id collided within a millisecond is the sweep's to find."""
    users = [make_user(config=None) for _ in range(5)]  # no key: tags from the note's #hashtag
    messages = [make_message(users[n % 5], 'web app note %d #batch%d' % (n, n % 7)) for n in range(1000)]
    consumer = start_consumer('-w', '4', env=no_sweep(crash_env))
    jobs, bad = [], []
    for n, message in enumerate(messages):
        jobs.append(('auto-tag', {'userId': message.author_id, 'messageId': message.id}))
        if n % 16 == 0:
            jobs.append(('no-such-job', {'n': n}))
            bad.append(len(jobs) - 1)
    ids = webapp.add(*jobs)
    good_ids = {job_id for n, job_id in enumerate(ids) if n not in bad}
    bad_ids = {ids[n] for n in bad}
    counts = settled(webapp)
    assert counts['wait'] == counts['active'] == counts['delayed'] == 0
    assert counts['completed'] == min(100, len(good_ids))
    assert counts['failed'] == min(50, len(bad_ids)) and len(bad_ids) > 50
    # Every job BullMQ kept became a task: as many messages tagged as distinct ids.
    done = JobState.select().where((JobState.kind == 'auto-tag') & (JobState.status == 'done'))
    wait_for(lambda: done.count() == len(good_ids), timeout=120, what='every taken job to run')
    # The rest (ids that collided) are found by the sweep.
    dropped = len(messages) - len(good_ids)
    sweep = cli(dict(crash_env, SWEEP_GRACE_SECONDS='0.01'), str(tmp_path), 'sweep', '--limit', '1000')
    assert sweep.returncode == 0 and 'recent %d' % dropped in sweep.stdout, sweep.stdout + sweep.stderr
    wait_for(lambda: done.count() == len(messages), timeout=120, what='the swept messages to run')
    assert all(tag_names(message.id) for message in messages[::50])
    consumer.stop()


def test_bad_jobs_fail_with_their_reason_and_are_never_retried(db, crash_env, start_consumer, webapp):  # noqa: F811
    user = make_user(config=None)
    good = make_message(user, 'still going #onwards')
    consumer = start_consumer('-w', '2', env=no_sweep(crash_env))
    bad = {
        'no-such-job': ({'userId': user.id, 'messageId': good.id}, "unknown job name 'no-such-job'"),
        'auto-tag': ({'messageId': good.id}, 'auto-tag job: its data has no valid userId'),
        'sync-ragflow': ('not an object', 'sync-ragflow job: its data is not an object'),
    }
    ids = add_apart(webapp, *((name, data) for name, (data, _) in bad.items()),
                    ('auto-tag', {'userId': user.id, 'messageId': "x' OR 1=1"}),
                    ('sync-ragflow', {'userId': user.id, 'messageId': good.id, 'contentType': 'comment'}),
                    ('auto-tag-comment', {'userId': user.id, 'commentId': good.id}),
                    ('sync-ragflow', {'userId': user.id, 'messageId': good.id, 'contentType': 'draft'}),
                    *((kind, {'type': 'message', 'id': good.id}) for kind in NOT_HANDLED),
                    *((kind, {'type': 'message', 'id': good.id}) for kind in NOT_HANDLED),
                    ('auto-tag', {'userId': user.id, 'messageId': good.id}))
    wait_for(lambda: tag_names(good.id) == ['onwards'], what='the good job after the bad ones')
    counts = settled(webapp)
    assert (counts['completed'], counts['failed'], counts['delayed']) == (1, len(ids) - 1, 0)
    failed = {job['id']: job for job in webapp.failed()}
    assert all(job['attemptsMade'] == 1 for job in failed.values())  # not retried
    reasons = [failed[job_id]['failedReason'] for job_id in ids[:-1]]
    for (_, reason), text in zip(bad.values(), reasons, strict=False):
        assert text.startswith(reason), text
    assert reasons[3].startswith('auto-tag job: its data has no valid messageId')
    assert reasons[4] == 'sync-ragflow job: a comment, but this WhiteNote (stage7) has no comments'
    assert reasons[5] == 'auto-tag-comment job: a comment, but this WhiteNote (stage7) has no comments'
    assert reasons[6] == "sync-ragflow job: contentType 'draft' is neither message nor comment"
    for kind, text in zip(NOT_HANDLED * 2, reasons[7:], strict=True):
        assert text == 'job kind %s is not handled here (whitenote-huey does not do it)' % kind
    assert consumer.process.poll() is None
    consumer.stop()
    log = consumer.log()
    for kind in NOT_HANDLED:  # logged once per kind per start
        assert log.count('job kind %s is not handled here' % kind) == 1, kind
    assert log.count("unknown job name 'no-such-job'") == 1
    assert job_state('auto-tag', "x' OR 1=1") is None


def test_jobs_enqueued_while_no_consumer_runs_are_taken_when_one_starts(db, crash_env, start_consumer,  # noqa: F811
                                                                         webapp):
    user = make_user(config=None)
    notes = [make_message(user, 'written while the worker was down #offline%d' % n) for n in range(3)]
    add_apart(webapp, *(('auto-tag', {'userId': user.id, 'messageId': note.id}) for note in notes))
    assert webapp.counts()['wait'] == 3
    start_consumer('-w', '2', env=no_sweep(crash_env))
    wait_for(lambda: all(tag_names(note.id) for note in notes), what='the waiting jobs taken')
    assert settled(webapp)['completed'] == 3


@POSTGRESQL_ONLY
def test_a_crash_between_bullmq_and_huey_loses_nothing(db, crash_env, start_consumer, webapp, model,  # noqa: F811
                                                       ragflow, tmp_path):
    """Killed while taking the web app's jobs and running them: the database is the
    truth, so the sweep finds every message the lost jobs were for."""
    datasets = people(model, ragflow)
    model.default = tags('alpha', 'beta', delay=0.2)
    first = start_consumer('-w', '4', log='first')
    messages = write(datasets, 60)
    ids = webapp.add(*(('auto-tag', {'userId': m.author_id, 'messageId': m.id}) for m in messages))
    wait_for(lambda: len(model.chat_requests()) >= 8, what='the consumer to be busy')
    first.stop(signal.SIGKILL)
    assert unfinished(messages, datasets, ragflow)  # cut off mid-way
    second = start_consumer('-w', '4', log='second')
    wait_until_done(messages, datasets, ragflow, sweep_env=crash_env, cwd=str(tmp_path))
    # BullMQ hands out again what the killed consumer held once its lock lapses.
    counts = settled(webapp)
    assert counts['failed'] == 0 and counts['completed'] == min(100, len(set(ids)))
    second.stop()
    assert unfinished(messages, datasets, ragflow) == []


def bridge_clients(server, queue: str) -> int:
    """Redis connections that name themselves as this queue's workers."""
    return sum(client['name'].startswith('bull:%s:w:' % queue) for client in server.client().client_list())


def test_one_taker_per_consumer_however_it_is_started(db, crash_env, redis_server, webapp, tmp_path):  # noqa: F811
    """huey_consumer itself, and run_consumer.sh with threads and with processes: one
    taker each, taking jobs, stopped (and worker:status cleared) on a clean stop."""
    user = make_user(config=None)
    env = dict(os.environ, **no_sweep(crash_env), WORKERS='3',
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
    consumer = os.path.join(os.path.dirname(sys.executable), 'huey_consumer')
    ways = [('huey_consumer -w 1', [consumer, 'whitenote_huey.huey', '-w', '1'], {}, signal.SIGINT),
            ('huey_consumer -w 3', [consumer, 'whitenote_huey.huey', '-w', '3'], {}, signal.SIGINT),
            ('run_consumer.sh threads', [os.path.join(ROOT, 'run_consumer.sh')], {'WORKER_TYPE': 'thread'},
             signal.SIGTERM),
            ('run_consumer.sh processes', [os.path.join(ROOT, 'run_consumer.sh')],
             {'WORKER_TYPE': 'process'}, signal.SIGTERM)]
    clients = {}
    for n, (way, command, extra, stop) in enumerate(ways):
        log_path = tmp_path / ('way%d.log' % n)
        with open(log_path, 'wb') as log:
            process = subprocess.Popen(command, cwd=str(tmp_path), env=dict(env, **extra), stdout=log,
                                       stderr=subprocess.STDOUT)
        try:
            note = make_message(user, 'taken by %s #way%d' % (way, n))
            webapp.add(('auto-tag', {'userId': user.id, 'messageId': note.id}))
            wait_for(lambda: tag_names(note.id) == ['way%d' % n], what='the job, through ' + way)  # noqa: B023
            time.sleep(1)  # room for a second taker, were there one
            clients[way] = bridge_clients(redis_server, webapp.name)
            status = json.loads(redis_server.client().get('worker:status'))
            assert status['running'] is True and status['pid'] == process.pid, way
            process.send_signal(stop)
            assert process.wait(30) == 0, way
        finally:
            if process.poll() is None:
                process.kill()
        text = log_path.read_text()
        assert text.count("[bullmq] taking the web app's jobs") == 1, (way, text[-2000:])
        assert text.count('[bullmq] stopped taking jobs') == 1, way
        assert redis_server.client().get('worker:status') is None, way
        assert bridge_clients(redis_server, webapp.name) == 0, way
    assert clients['huey_consumer -w 1'] > 0
    assert set(clients.values()) == {clients['huey_consumer -w 1']}, clients


def test_worker_status_as_the_node_worker_kept_it(db, crash_env, start_consumer, redis_server, webapp):  # noqa: F811
    """The web app's health page reads worker:status ({"running": true, ...}); it lapses by
    itself when a consumer is killed, and is kept with the taker turned off too."""
    conn = redis_server.client()
    killed = start_consumer('-w', '2', log='killed')
    wait_for(lambda: conn.get('worker:status'), what='worker:status')
    status = json.loads(conn.get('worker:status'))
    assert set(status) == {'running', 'startedAt', 'pid'} and status['running'] is True
    assert status['pid'] == killed.process.pid
    started = datetime.datetime.fromisoformat(status['startedAt'].replace('Z', '+00:00'))
    assert abs((datetime.datetime.now(datetime.UTC) - started).total_seconds()) < 120
    assert 0 < conn.ttl('worker:status') <= whitenote_huey.WORKER_STATUS_TTL
    killed.stop(signal.SIGKILL)
    assert 0 < conn.ttl('worker:status') <= whitenote_huey.WORKER_STATUS_TTL  # gone within the TTL
    conn.delete('worker:status')
    # BULLMQ_QUEUE empty: no taker, the web app's jobs wait, the status is kept all the same.
    user = make_user(config=None)
    note = make_message(user, 'waits for a taker #later')
    off = start_consumer('-w', '2', env=dict(no_sweep(crash_env), BULLMQ_QUEUE=''), log='off')
    webapp.add(('auto-tag', {'userId': user.id, 'messageId': note.id}))
    wait_for(lambda: conn.get('worker:status'), what='worker:status without the taker')
    time.sleep(1)
    assert webapp.counts()['wait'] == 1 and tag_names(note.id) == []
    assert off.stop() == 0
    assert conn.get('worker:status') is None
    assert '[bullmq]' not in off.log()


def test_the_daily_briefing_job_makes_each_briefing_once(db, crash_env, start_consumer, webapp):  # noqa: F811
    """The web app's repeatable daily-briefing job becomes a dispatch of the briefings due:
    however often it comes, one briefing per user and day."""
    # -n: no periodic task of its own, and the users come after its start-up pass (which
    # dispatches the briefings due too): the briefings come from the web app's job only.
    consumer = start_consumer('-w', '2', '-n', env=no_sweep(crash_env))
    wait_for(lambda: '[sweep] start-up pass' in consumer.log(), what='the start-up pass')
    users = [make_user(config={'briefing_time': '00:00'}) for _ in range(2)]
    yesterday = whitenote_huey.local_now().date() - datetime.timedelta(days=1)
    noon = datetime.datetime.combine(yesterday, datetime.time(12))
    for user in users:
        make_message(user, 'what I did yesterday', created_at=noon)
    made = Briefing.select().where(Briefing.day == yesterday)
    add_apart(webapp, *(('daily-briefing', {}) for _ in range(3)))
    webapp.add_cron('daily-briefing', '* * * * * *')  # as the web app registers it, every second here
    wait_for(lambda: made.count() == 2 and all(row.status == 'done' for row in made), what='the briefings')
    time.sleep(3)  # more of the repeatable job
    counts = webapp.counts()
    assert counts['completed'] >= 5 and counts['failed'] == 0, counts
    briefings = Message.select().where(Message.content.startswith(whitenote_huey.briefing_title(yesterday)))
    assert sorted(message.author_id for message in briefings) == sorted(user.id for user in users)
    consumer.stop()


def test_the_web_apps_jobs_with_workspaces_become_their_tasks(wdb, redis_server, webapp, model,  # noqa: F811
                                                               ragflow, tmp_path):
    """c39d8d0's jobs: auto-tag with workspaceId, and for a new comment auto-tag-comment and
    sync-ragflow of the comment side by side: each item tagged, and uploaded once."""
    user, key = owner(model, ragflow)
    dataset = ragflow.add_dataset(key)
    workspace = make_workspace(user, 'Work', True, dataset)
    note = make_ws_message(user, 'a note in a workspace', workspace)
    comment = Comment.create(message=note.id, author=user, content='a comment on it')
    env = {'DATABASE_URL': wdb.url, 'REDIS_URL': redis_server.url, 'LOG_LEVEL': 'INFO',
           'WHITENOTE_SECRET': os.environ['WHITENOTE_SECRET'], 'SWEEP_GRACE_SECONDS': '3600'}
    consumer = Consumer(env, str(tmp_path), '-w', '2').start()
    try:
        add_apart(webapp, ('auto-tag', {'userId': user.id, 'workspaceId': workspace.id, 'messageId': note.id}),
                  ('auto-tag-comment', {'userId': user.id, 'workspaceId': workspace.id,
                                        'commentId': comment.id, 'contentType': 'comment'}),
                  ('sync-ragflow', {'userId': user.id, 'workspaceId': workspace.id,
                                    'messageId': comment.id, 'contentType': 'comment'}))

        def synced() -> bool:
            states = [job_state('sync-ragflow', note.id), job_state('sync-ragflow-comment', comment.id)]
            return all(state is not None and state.status == 'done' for state in states)
        wait_for(synced, timeout=60, what='the note and the comment synced')
        counts = settled(webapp)
    finally:
        consumer.stop()
    assert (counts['completed'], counts['failed']) == (3, 0)
    assert tag_names(note.id) == ['alpha', 'beta'] and comment_tags(comment.id) == ['alpha', 'beta']
    assert ragflow.count('POST', '/documents') == 2  # one upload each, after tagging
    assert sorted(doc['content'] for doc in ragflow.documents(dataset)) == [
        '#alpha #beta\n\na comment on it', '#alpha #beta\n\na note in a workspace']
    assert '[bullmq] job auto-tag-comment-' in consumer.log()
