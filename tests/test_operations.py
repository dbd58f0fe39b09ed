"""Running the worker day to day: status, retry, retag, enqueue, logs, metrics, quick start."""
import dataclasses
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
from fake_model import FakeModel
from fake_model import error
from fake_model import tags
from fake_model import text
from services import ROOT
from services import Consumer
from services import cli
from services import drain
from services import free_port
from services import job_state
from services import make_message
from services import make_user
from services import model_config
from services import subprocess_env
from services import tag_names
from services import wait_for
from services import worker_env

import models
import whitenote_huey
from models import JobState
from models import utcnow

STATUS_KEYS = {'queue', 'jobs', 'oldest_pending_seconds', 'failures', 'runs', 'briefings'}
BUCKETS = {'done', 'pending', 'running', 'failed', 'skipped', 'other'}


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """The command line in this process (so it uses the test's database and queue)."""
    code = whitenote_huey.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def status_json(capsys) -> dict:
    code, out, _ = run_main(capsys, 'status', '--json')
    assert code == 0
    return json.loads(out)


def state_row(kind: str, message_id: str, user_id: str, status: str, **fields) -> JobState:
    """A job state as another job kind (or a dead worker) would have left it."""
    return JobState.create(kind=kind, message_id=message_id, user_id=user_id, status=status,
                           **fields)


def failed_auto_tag(model, user, content: str):
    """A message whose auto-tag failed for good (the model answered prose)."""
    message = make_message(user, content)
    model.respond(text('no tags from me'))
    whitenote_huey.auto_tag(user.id, message.id)
    drain(whitenote_huey.huey)
    assert job_state('auto-tag', message.id).status == 'failed'
    return message


# 1. status

@pytest.mark.usefixtures('db', 'redis_queue')
def test_status_json_counts_every_kind_in_one_table(model, capsys):
    user = make_user(config=model_config(model))
    off = make_user(config=model_config(model, enable_auto_tag=False))
    done = make_message(user, 'tagged fine')
    whitenote_huey.auto_tag(user.id, done.id)
    whitenote_huey.auto_tag(off.id, make_message(off, 'not wanted').id)
    drain(whitenote_huey.huey)
    bad = failed_auto_tag(model, user, 'doomed')
    state_row('auto-tag', 'm-running', user.id, 'running')
    state_row('auto-tag', 'm-retrying', user.id, 'retrying', last_error='TransientError: busy')
    state_row('sync-ragflow', done.id, user.id, 'done')
    state_row('sync-ragflow', 'm-new-status', user.id, 'uploading')
    state_row('sync-ragflow', 'm-queued', user.id, 'queued')  # enqueued by the sweep
    whitenote_huey.auto_tag(user.id, 'queued-1')
    whitenote_huey.huey.add_schedule(whitenote_huey.auto_tag.s(user.id, 'later-1', delay=3600))

    report = status_json(capsys)
    assert set(report) == STATUS_KEYS
    assert report['queue'] == {'backend': 'redis', 'pending': 1, 'scheduled': 1, 'error': None}
    assert report['jobs'] == {
        'auto-tag': {'done': 1, 'pending': 1, 'running': 1, 'failed': 1, 'skipped': 1, 'other': 0},
        'sync-ragflow': {'done': 1, 'pending': 1, 'running': 0, 'failed': 0, 'skipped': 0, 'other': 1},
    }
    [failure] = report['failures']
    assert set(failure) == {'kind', 'message_id', 'day', 'user_id', 'workspace_id', 'time', 'error', 'attempts'}
    assert (failure['kind'], failure['message_id'], failure['attempts']) == ('auto-tag', bad.id, 1)
    assert 'no JSON list' in failure['error'] and failure['time'].endswith('Z')
    assert report['oldest_pending_seconds'] >= 0
    assert report['runs'] == []


@pytest.mark.usefixtures('db', 'redis_queue')
def test_status_lists_the_latest_failures_newest_first(model, capsys):
    user = make_user(config=model_config(model))
    old = failed_auto_tag(model, user, 'first failure')
    JobState.update(updated_at=utcnow() - datetime.timedelta(hours=1)).where(
        JobState.message_id == old.id).execute()
    new = failed_auto_tag(model, user, 'second failure')
    report = status_json(capsys)
    assert [f['message_id'] for f in report['failures']] == [new.id, old.id]
    code, out, _ = run_main(capsys, 'status', '--json', '--failures', '1')
    assert [f['message_id'] for f in json.loads(out)['failures']] == [new.id]


@pytest.mark.usefixtures('db', 'redis_queue')
def test_status_on_a_terminal_is_a_readable_summary(model, capsys):
    user = make_user(config=model_config(model))
    bad = failed_auto_tag(model, user, 'doomed')
    whitenote_huey.record_run('sweep', 'done', started_at=utcnow(), finished_at=utcnow(),
                              counts={'enqueued': 3})
    code, out, _ = run_main(capsys, 'status')
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == 'queue (redis): 0 waiting, 0 scheduled'
    assert lines[2].split() == ['job', 'done', 'pending', 'running', 'failed', 'skipped']
    assert lines[3].split() == ['auto-tag', '0', '0', '0', '1', '0']
    assert any(bad.id in line and 'attempts 1' in line and 'no JSON list' in line for line in lines)
    assert any(line.startswith('  sweep: done;') and 'enqueued 3' in line for line in lines)


def test_status_says_when_the_queue_is_unreachable(db, tmp_path):
    env = dict(worker_env(db, redis=False), REDIS_URL='redis://127.0.0.1:1/0')
    result = cli(env, str(tmp_path), 'status', '--json')
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert report['queue']['pending'] is None and 'Error' in report['queue']['error']
    assert set(report['jobs']['auto-tag']) == BUCKETS


@pytest.mark.usefixtures('db')
def test_record_run_keeps_one_row_per_activity(capsys):
    start = utcnow() - datetime.timedelta(minutes=5)
    whitenote_huey.record_run('sweep', 'done', started_at=start, finished_at=start,
                              counts={'enqueued': 2})
    with whitenote_huey.recorded_run('sweep') as counts:
        row = models.WorkerRun.get_by_id('sweep')
        assert row.outcome == 'running' and row.finished_at == start
        counts['enqueued'] = 5
    with pytest.raises(RuntimeError), whitenote_huey.recorded_run('briefing'):
        raise RuntimeError('model down for key sk-runs-secret-123456')
    runs = {run['name']: run for run in status_json(capsys)['runs']}
    assert set(runs) == {'briefing', 'sweep'} and models.WorkerRun.select().count() == 2
    assert runs['sweep']['outcome'] == 'done' and runs['sweep']['counts'] == {'enqueued': 5}
    assert runs['sweep']['finished_at'] > start.isoformat(timespec='seconds')
    assert runs['briefing']['outcome'] == 'failed' and 'model down' in runs['briefing']['detail']
    assert 'sk-runs-secret-123456' not in runs['briefing']['detail']


# 2. retry and retag

@pytest.mark.usefixtures('db', 'redis_queue')
def test_retry_marks_failed_jobs_pending_and_runs_them_again(model, capsys):
    user = make_user(config=model_config(model))
    first = failed_auto_tag(model, user, 'first')
    second = failed_auto_tag(model, user, 'second')
    code, out, _ = run_main(capsys, 'retry', '--message', first.id)
    assert code == 0 and 'enqueued 1 ' in out
    assert job_state('auto-tag', first.id).status == 'pending'
    assert job_state('auto-tag', second.id).status == 'failed'
    counts = status_json(capsys)['jobs']['auto-tag']
    assert (counts['pending'], counts['failed']) == (1, 1)
    code, out, _ = run_main(capsys, 'retry', '--kind', 'auto-tag')
    assert code == 0 and 'enqueued 1 ' in out
    assert len(whitenote_huey.huey) == 2
    drain(whitenote_huey.huey)
    assert tag_names(first.id) == tag_names(second.id) == ['alpha', 'beta']
    assert job_state('auto-tag', first.id).status == 'done'
    code, out, _ = run_main(capsys, 'retry')
    assert code == 0 and 'enqueued 0 ' in out and len(whitenote_huey.huey) == 0


@pytest.mark.usefixtures('db', 'redis_queue')
def test_retry_leaves_kinds_it_has_no_task_for(model, capsys):
    user = make_user(config=model_config(model))
    state_row('daily-briefing', 'd-1', user.id, 'failed', last_error='x')
    code, out, _ = run_main(capsys, 'retry')
    assert code == 0 and 'enqueued 0 ' in out and '1 of a kind with no task' in out
    assert job_state('daily-briefing', 'd-1').status == 'failed'


@pytest.mark.usefixtures('db', 'redis_queue')
def test_retag_reruns_tagged_messages_and_stays_idempotent(model, capsys, monkeypatch):
    monkeypatch.setattr(whitenote_huey, 'BATCH_SIZE', 3)  # several pages
    user = make_user(config=model_config(model))
    messages = [make_message(user, 'note %d' % i) for i in range(7)]
    for message in messages:
        whitenote_huey.auto_tag(user.id, message.id)
    drain(whitenote_huey.huey)
    assert len(model.chat_requests()) == 7
    model.default = tags('retagged')
    code, out, _ = run_main(capsys, 'retag', '--all')
    assert code == 0 and 'enqueued auto-tag for 7 message(s)' in out
    assert {job_state('auto-tag', m.id).status for m in messages} == {'pending'}
    assert status_json(capsys)['jobs']['auto-tag']['pending'] == 7
    run_main(capsys, 'retag', '--all')  # run again before the worker caught up
    assert len(whitenote_huey.huey) == 14
    drain(whitenote_huey.huey)
    assert len(model.chat_requests()) == 14  # 7 + 7: the duplicate jobs found the work done
    assert all(tag_names(m.id) == ['retagged'] for m in messages)
    whitenote_huey.auto_tag(user.id, messages[0].id)
    drain(whitenote_huey.huey)
    assert len(model.chat_requests()) == 14  # a normal run of unchanged content does nothing


@pytest.mark.usefixtures('db', 'redis_queue')
def test_retag_selects_by_user_day_and_failure(model, capsys):
    ann = make_user(config=model_config(model))
    bob = make_user(config=model_config(model))
    off = make_user(config=model_config(model, enable_auto_tag=False))
    old = make_message(ann, 'old', created_at=datetime.datetime(2024, 1, 1, 12))
    new = make_message(ann, 'new', created_at=datetime.datetime(2024, 3, 1, 12))
    bobs = make_message(bob, 'bob', created_at=datetime.datetime(2024, 3, 2, 12))
    make_message(off, 'off', created_at=datetime.datetime(2024, 3, 2, 12))
    failed = failed_auto_tag(model, bob, 'broken')

    def retagged(*args) -> set:
        whitenote_huey.huey.flush()
        code, out, _ = run_main(capsys, 'retag', *args)
        assert code == 0, out
        return {task.args[1] for task in whitenote_huey.huey.pending()}

    assert retagged('--failed') == {failed.id}
    assert retagged('--user', ann.id) == {old.id, new.id}
    assert retagged('--since', '2024-02-01', '--user', bob.id) == {bobs.id, failed.id}
    assert retagged('--all') == {old.id, new.id, bobs.id, failed.id}
    code, out, _ = run_main(capsys, 'retag', '--since', '2024-03-02')
    assert code == 0 and 'for 2 message(s), skipped 1 whose author turned auto-tag off' in out
    code, _, err = run_main(capsys, 'retag')
    assert code == 2 and '--all' in err


def test_retag_since_is_a_day_in_the_configured_time_zone(monkeypatch):
    monkeypatch.setattr(whitenote_huey, 'settings', dataclasses.replace(
        whitenote_huey.settings, timezone=whitenote_huey.ZoneInfo('Asia/Shanghai')))
    assert whitenote_huey.local_day('2024-03-02') == datetime.datetime(2024, 3, 1, 16)


@pytest.mark.usefixtures('db', 'redis_queue')
def test_bulk_retag_waits_behind_a_new_message_on_redis(model, capsys):
    user = make_user(config=model_config(model))
    bulk = {make_message(user, 'old note %d' % i).id for i in range(30)}
    assert run_main(capsys, 'retag', '--all')[0] == 0
    new = make_message(user, 'written just now')
    whitenote_huey.auto_tag(user.id, new.id)
    order = [whitenote_huey.huey.dequeue().args[1] for _ in range(31)]
    assert order[0] == new.id
    assert set(order[1:]) == bulk


def test_bulk_retag_waits_behind_a_new_message_on_the_sqlite_queue(db, tmp_path):
    user = make_user(config={})
    bulk = {make_message(user, 'old note %d' % i).id for i in range(30)}
    new = make_message(user, 'written just now')
    env = worker_env(db, redis=False)
    retag = cli(env, str(tmp_path), 'retag', '--user', user.id, '--since', '2000-01-01')
    assert retag.returncode == 0, retag.stderr
    assert 'enqueued auto-tag for 31 message(s)' in retag.stdout
    enqueue = cli(env, str(tmp_path), 'enqueue', 'auto-tag', new.id)
    assert enqueue.returncode == 0, enqueue.stderr
    queue = whitenote_huey.make_huey(dataclasses.replace(
        whitenote_huey.settings, redis_url='', database_url='sqlite:///%s/q.db' % tmp_path))
    assert queue.storage.filename == str(tmp_path / 'whitenote-queue.db')
    order = [queue.serializer.deserialize(queue.storage.dequeue()).args[1] for _ in range(32)]
    assert order[0] == new.id
    assert set(order[1:]) == bulk | {new.id}


class SilentServer:
    """A TCP server that accepts and never answers: a queue that hangs."""

    def __enter__(self):
        self.sock = socket.create_server(('127.0.0.1', 0))
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()
        return 'redis://127.0.0.1:%d/0' % self.sock.getsockname()[1]

    def _accept(self):
        while True:
            try:
                self.connections.append(self.sock.accept()[0])
            except OSError:
                return

    def __exit__(self, *exc):
        self.sock.close()
        for connection in self.connections:
            connection.close()


@pytest.mark.usefixtures('redis_queue')
def test_retag_interrupted_then_run_again_tags_everything(db, tmp_path, monkeypatch):
    user = make_user(config={})
    messages = [make_message(user, 'note #t%02d' % i) for i in range(12)]
    with SilentServer() as hanging_queue:
        env = dict(worker_env(db, redis=False), REDIS_URL=hanging_queue)
        process = subprocess.Popen([sys.executable, '-m', 'whitenote_huey', 'retag', '--all'],
                                   cwd=tmp_path, env=subprocess_env(env), text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # The first page is marked pending, then the enqueue waits on the silent queue.
        wait_for(lambda: JobState.select().where(JobState.status == 'pending').count() == 12,
                 what='retag to mark the first page')
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert 'interrupted after 0 job(s) enqueued; running it again is safe' in err
    assert 'Traceback' not in err
    again = cli(worker_env(db, redis=True), str(tmp_path), 'retag', '--all')
    assert again.returncode == 0 and 'for 12 message(s)' in again.stdout, again.stderr
    drain(whitenote_huey.huey)
    assert [tag_names(m.id) for m in messages] == [['t%02d' % i] for i in range(12)]


# 3. enqueue

def test_enqueue_exit_codes_and_messages(db, tmp_path):
    user = make_user(config={})
    message = make_message(user, 'enqueue me')
    gone = make_message(user, 'soon gone')
    state_row('auto-tag', gone.id, user.id, 'done')
    gone.delete_instance()
    env = worker_env(db, redis=False)
    ok = cli(env, str(tmp_path), 'enqueue', 'auto-tag', message.id)
    assert (ok.returncode, ok.stdout) == (0, 'enqueued auto-tag for message %s\n' % message.id)
    deleted = cli(env, str(tmp_path), 'enqueue', 'auto-tag', gone.id)
    assert deleted.returncode == 0 and 'the message is gone' in deleted.stdout
    missing = cli(env, str(tmp_path), 'enqueue', 'auto-tag', 'no-such-id')
    assert missing.returncode == 1 and "no message with id 'no-such-id'" in missing.stderr
    bad_kind = cli(env, str(tmp_path), 'enqueue', 'make-coffee', message.id)
    assert bad_kind.returncode == 2 and 'invalid choice' in bad_kind.stderr
    down = cli(dict(env, REDIS_URL='redis://127.0.0.1:1/0'), str(tmp_path), 'enqueue', 'auto-tag',
               message.id)
    assert down.returncode == 3 and 'the database or the queue failed' in down.stderr
    assert 'Traceback' not in down.stderr


# 4. logs

MARKER_KEY = 'sk-MARKERKEY-0123456789'
MARKER_TEXT = 'MARKER-NOTE-TEXT-do-not-log'


def insert_marked_messages(user_key: str, model) -> list[tuple[str, str]]:
    good = make_user(config=model_config(model))
    bad = make_user(config={**model_config(model), 'openai_api_key': user_key})
    return [(good.id, make_message(good, MARKER_TEXT + ' one').id),
            (bad.id, make_message(bad, MARKER_TEXT + ' two').id)]


def test_json_logs_from_huey_consumer(db, redis_queue, tmp_path):
    with FakeModel(api_key='sk-right-key-9876543210') as model:
        jobs = insert_marked_messages(MARKER_KEY, model)
        consumer = Consumer(dict(worker_env(db, redis=True), LOG_FORMAT='json'), str(tmp_path)).start()
        try:
            for user_id, message_id in jobs:
                whitenote_huey.auto_tag(user_id, message_id)
            wait_for(lambda: all(job_state('auto-tag', m) and job_state('auto-tag', m).status
                                 in ('done', 'failed') for _, m in jobs), what='both jobs')
        finally:
            consumer.stop()
    lines = consumer.log().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({'time', 'level', 'logger', 'message'} <= set(entry) for entry in entries)
    assert any(entry['message'].startswith('Huey consumer started') for entry in entries)
    (good_user, good), (bad_user, bad) = jobs
    ends = {entry['message_id']: entry for entry in entries if 'outcome' in entry}
    assert ends[good]['outcome'] == 'done' and ends[good]['level'] == 'INFO'
    assert ends[good]['kind'] == 'auto-tag' and ends[good]['user_id'] == good_user
    assert ends[good]['attempt'] == 1 and isinstance(ends[good]['duration'], float)
    assert ends[bad]['outcome'] == 'failed' and ends[bad]['level'] == 'ERROR'
    assert 'HTTP 401' in ends[bad]['message']
    starts = [e for e in entries if e.get('message_id') == bad and 'started' in e['message']]
    assert starts and starts[0]['user_id'] == bad_user
    info = '\n'.join(line for line, entry in zip(lines, entries, strict=True) if entry['level'] == 'INFO')
    assert MARKER_TEXT not in info and MARKER_KEY not in info
    assert MARKER_KEY not in consumer.log() and 'sk-right-key-9876543210' not in consumer.log()


def test_json_logs_from_the_command_line(tmp_path):
    env = {'DATABASE_URL': 'sqlite:///%s/cli.db' % tmp_path, 'LOG_FORMAT': 'json',
           'REDIS_URL': 'redis://127.0.0.1:1/0', 'WHITENOTE_SECRET': 's' * 32}
    result = cli(env, str(tmp_path), 'note', '--user', 'a@example.org', MARKER_TEXT)
    assert result.returncode == 0, result.stderr
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith('{')]
    assert [entry['level'] for entry in logged] == ['WARNING']
    assert 'left for the sweep' in logged[0]['message'] and logged[0]['logger'] == 'huey.whitenote'
    assert MARKER_TEXT not in result.stderr


@pytest.mark.parametrize('name, value', [('LOG_FORMAT', 'yaml'), ('METRICS_PORT', 'ninety'),
                                         ('METRICS_PORT', '70000')])
def test_bad_log_or_metrics_setting_is_named(tmp_path, name, value):
    result = cli({name: value}, str(tmp_path), 'status')
    assert result.returncode != 0 and name in result.stderr and 'Traceback' not in result.stderr


# 5. metrics

def scrape(port: int) -> str:
    with urllib.request.urlopen('http://127.0.0.1:%d/metrics' % port, timeout=10) as response:
        return response.read().decode()


def sample(page: str, name: str) -> float | None:
    for line in page.splitlines():
        if line.startswith(name + ' '):
            return float(line.rsplit(' ', 1)[1])
    return None


def test_consumer_serves_prometheus_metrics(db, redis_queue, tmp_path):
    port = free_port()
    with FakeModel(api_key='sk-metrics-key-000') as model:
        user = make_user(config=model_config(model))
        first, second = make_message(user, 'one'), make_message(user, 'two')
        state_row('sync-ragflow', 'waiting', user.id, 'retrying',  # due later: the sweep waits
                  updated_at=utcnow() - datetime.timedelta(hours=1),
                  lease_until=utcnow() + datetime.timedelta(hours=1))
        model.respond(tags('ok'), error(503, 'busy'))
        consumer = Consumer(dict(worker_env(db, redis=True), METRICS_PORT=str(port)),
                            str(tmp_path)).start()
        try:
            whitenote_huey.auto_tag(user.id, first.id)
            wait_for(lambda: job_state('auto-tag', first.id)
                     and job_state('auto-tag', first.id).status == 'done', what='first job')
            whitenote_huey.auto_tag(user.id, second.id)
            wait_for(lambda: job_state('auto-tag', second.id)
                     and job_state('auto-tag', second.id).status == 'done', what='retried job')
            page = wait_for(lambda: _scrape_or_none(port), what='/metrics')
        finally:
            consumer.stop()
    assert sample(page, 'whitenote_jobs_total{kind="auto-tag",outcome="done"}') == 2
    assert sample(page, 'whitenote_jobs_total{kind="auto-tag",outcome="retrying"}') == 1
    assert sample(page, 'whitenote_job_retries_total{kind="auto-tag"}') == 1
    assert sample(page, 'whitenote_job_duration_seconds_count{kind="auto-tag"}') == 3
    assert sample(page, 'whitenote_queue_length') == 0
    assert sample(page, 'whitenote_scheduled_jobs') == 0
    assert 3500 < sample(page, 'whitenote_oldest_pending_seconds') < 36000
    assert 'metrics: serving' in consumer.log()


def _scrape_or_none(port: int) -> str | None:
    try:
        return scrape(port)
    except OSError:
        return None


@pytest.mark.usefixtures('db', 'redis_queue')
def test_gauges_are_read_at_scrape_time():
    import prometheus_client
    user = make_user(config={})
    registry = whitenote_huey.Metrics().registry  # this process has no METRICS_PORT
    page = prometheus_client.generate_latest(registry).decode()
    assert sample(page, 'whitenote_queue_length') == 0
    assert sample(page, 'whitenote_oldest_pending_seconds') == 0
    for i in range(3):
        whitenote_huey.auto_tag(user.id, 'queued-%d' % i)
    state_row('auto-tag', 'queued-0', user.id, 'retrying',
              updated_at=utcnow() - datetime.timedelta(minutes=10))
    page = prometheus_client.generate_latest(registry).decode()
    assert sample(page, 'whitenote_queue_length') == 3
    assert 590 < sample(page, 'whitenote_oldest_pending_seconds') < 3600


def test_without_the_metrics_extra_the_worker_warns_and_runs(db, redis_queue, tmp_path):
    shadow = tmp_path / 'shadow' / 'prometheus_client'
    shadow.mkdir(parents=True)
    (shadow / '__init__.py').write_text("raise ImportError('not installed (test shadow)')\n")
    user = make_user(config={})
    message = make_message(user, 'still #works')
    env = dict(worker_env(db, redis=True), METRICS_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join([str(tmp_path / 'shadow'), ROOT]))
    consumer = Consumer(env, str(tmp_path)).start()
    try:
        whitenote_huey.auto_tag(user.id, message.id)
        wait_for(lambda: tag_names(message.id) == ['works'], what='the job without metrics')
    finally:
        consumer.stop()
    log = consumer.log()
    assert log.count('prometheus-client is not installed') == 1
    assert "pip install 'whitenote-huey[metrics]'" in log


# 6. standalone: note and show

def test_note_adds_a_message_and_show_prints_it_tagged(db, tmp_path, capsys):
    env = worker_env(db, redis=False)
    result = cli(env, str(tmp_path), 'note', '--user', 'newcomer@example.org',
                 'Trying the worker #quickstart')
    if db.kind == 'postgresql':
        assert result.returncode == 1 and 'PostgreSQL' in result.stderr
        assert models.Message.select().count() == 0
        return
    assert result.returncode == 0, result.stderr
    message_id = result.stdout.strip()
    again = cli(env, str(tmp_path), 'note', '--user', 'newcomer@example.org', 'second')
    assert again.returncode == 0 and 'enqueued: auto-tag' in again.stderr
    assert models.User.select().where(models.User.email == 'newcomer@example.org').count() == 1
    before = cli(env, str(tmp_path), 'show', message_id)
    assert before.returncode == 0 and 'none has run yet' in before.stdout
    consumer = Consumer(env, str(tmp_path), '-w', '1').start()
    try:
        wait_for(lambda: tag_names(message_id) == ['quickstart'], what='the note to be tagged')
    finally:
        consumer.stop()
    shown = cli(env, str(tmp_path), 'show', message_id)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith('message %s by newcomer@example.org, ' % message_id)
    assert lines[1] == '  Trying the worker #quickstart'
    assert 'tags: #quickstart' in lines
    assert any(line.split()[:4] == ['auto-tag', 'done', 'attempts', '1,'] for line in lines)
    missing = cli(env, str(tmp_path), 'show', 'no-such-id')
    assert missing.returncode == 1 and 'no message' in missing.stderr


def test_quick_start_on_a_fresh_directory(tmp_path):
    """The README's quick start: no DATABASE_URL, no REDIS_URL, no key, nothing set up."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('DATABASE_URL', 'REDIS_URL', 'OPENAI_API_KEY', 'WHITENOTE_SECRET')}
    env['PYTHONPATH'] = ROOT
    bin_dir = os.path.dirname(sys.executable)

    def run(*args):
        return subprocess.run([os.path.join(bin_dir, 'whitenote-huey'), *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=60)

    env['PATH'] = bin_dir + os.pathsep + env['PATH']
    consumer = subprocess.Popen([os.path.join(ROOT, 'run_consumer.sh')], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        note = run('note', '--user', 'me@example.org', 'Reading about #python decorators')
        assert note.returncode == 0, note.stderr
        message_id = note.stdout.strip()
        wait_for(lambda: 'tags: #python' in run('show', message_id).stdout, what='the tag')
    finally:
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(30)
    status = json.loads(run('status', '--json').stdout)
    assert status['queue']['backend'] == 'sqlite' and status['jobs']['auto-tag']['done'] == 1


def test_concurrent_workers_on_sqlite_do_not_trip_on_locks(tmp_path):
    """Standalone mode runs several workers on one SQLite file: no job may fail on a lock."""
    url = 'sqlite:///%s/whitenote.db' % tmp_path
    whitenote_huey.use_database(url)
    try:
        models.create_tables()
        user = make_user(config={})
        messages = [make_message(user, 'busy #w%02d and #x%02d' % (i, i)) for i in range(24)]
        env = {'DATABASE_URL': url, 'WHITENOTE_SECRET': os.environ['WHITENOTE_SECRET']}
        assert cli(env, str(tmp_path), 'retag', '--all').returncode == 0
        consumer = Consumer(env, str(tmp_path), '-w', '6', '-d', '0.01', '-m', '0.05').start()
        try:
            wait_for(lambda: JobState.select().where(JobState.status == 'done').count() == 24,
                     what='all jobs done')
        finally:
            consumer.stop()
        assert 'locked' not in consumer.log()
        assert {job_state('auto-tag', m.id).attempts for m in messages} == {1}
    finally:
        whitenote_huey.use_database(os.environ['DATABASE_URL'])


def test_missing_worker_tables_are_made_on_sqlite_and_explained_on_postgresql(db, tmp_path):
    JobState.drop_table()
    try:
        status = cli(worker_env(db, redis=False), str(tmp_path), 'status', '--json')
    finally:
        models.create_tables()
    if db.kind == 'sqlite':  # standalone: a fresh directory just works
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)['jobs']['auto-tag']['done'] == 0
    else:  # beside WhiteNote: tables are made by the consumer or init-db, on purpose
        assert status.returncode == 3 and 'run whitenote-huey init-db' in status.stderr
