"""Crash tests: nothing is lost when the consumer or Redis dies.

Each test runs the real ``huey_consumer`` (or ``run_consumer.sh``) as a subprocess
against a redis-server it starts itself on a free port, without persistence, with the
fake model and RAGFlow servers counting requests, and short settings: a 3 s lease, a
5 s re-enqueue delay.  Where a test must not wait for the minute tick of the periodic
sweep it runs ``whitenote-huey sweep`` itself.  "Done" is checked on the database and
the fake RAGFlow for every message at the end.
"""
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from fake_model import error
from fake_model import tags
from fake_model import text
from services import ROOT
from services import Consumer
from services import RedisServer
from services import cli
from services import enqueue_in_subprocess
from services import job_state
from services import make_message
from services import make_user
from services import model_config
from services import ragflow_config
from services import require
from services import wait_for
from test_sync_ragflow import own_docs

import models
import whitenote_huey
from models import Briefing
from models import Message

ANSWER = '## 📝 昨日回顾\n读了书。\n\n## 💡 关键洞察\n多读书。\n\n## 🎯 今日建议\n继续读。'
# Where the database makes no difference (the queue, signals, timing), PostgreSQL only:
# the production pairing.  The rest runs on SQLite too.
POSTGRESQL_ONLY = pytest.mark.parametrize('db', ['postgresql'], indirect=True)


@pytest.fixture
def redis_server(tmp_path):
    require('redis-server', shutil.which('redis-server') is not None)
    server = RedisServer(str(tmp_path)).start()
    yield server
    server.kill()


@pytest.fixture
def crash_env(db, redis_server):
    """The consumers' settings: this test's Redis, short leases and delays."""
    return {'DATABASE_URL': db.url, 'REDIS_URL': redis_server.url, 'LOG_LEVEL': 'INFO',
            'WHITENOTE_SECRET': os.environ['WHITENOTE_SECRET'], 'JOB_LEASE_SECONDS': '3',
            'SWEEP_GRACE_SECONDS': '0.5', 'SWEEP_REQUEUE_SECONDS': '5'}


@pytest.fixture
def start_consumer(crash_env, tmp_path):
    """Start a consumer (``huey_consumer`` OPTIONS) on this test's settings; any still
    running when the test ends, passed or failed, is killed."""
    consumers = []

    def start(*options: str, env: dict | None = None, log: str = 'consumer') -> Consumer:
        consumer = Consumer(env or crash_env, str(tmp_path), *options,
                            log_path=str(tmp_path / ('%s.log' % log)))
        consumers.append(consumer.start())
        return consumer
    yield start
    for consumer in consumers:
        consumer.stop(signal.SIGKILL)


def people(model, ragflow, count: int = 5) -> dict:
    """Users who tag with the fake model and sync to a dataset of their own: {id: dataset}."""
    datasets = {}
    for _ in range(count):
        config = ragflow_config(ragflow, **model_config(model))
        datasets[make_user(config=dict(config, enable_briefing=False)).id] = config['ragflow_dataset_id']
    return datasets


def write(datasets: dict, count: int, what: str = 'note') -> list[Message]:
    """``count`` messages, spread over the users."""
    authors = list(datasets)
    return [make_message(authors[n % len(authors)], '%s %d of the crash test' % (what, n))
            for n in range(count)]


def started(consumer: Consumer) -> Consumer:
    """The consumer, once its start-up sweeps are over (they would find what a test
    writes next, and enqueue it a second time)."""
    wait_for(lambda: '[sweep] after-leases pass' in consumer.log(), what='the start-up sweeps')
    return consumer


def pairs(messages: list[Message]) -> list[tuple[str, str]]:
    return [(message.author_id, message.id) for message in messages]


def unfinished(messages: list[Message], datasets: dict, ragflow) -> list[str]:
    """What is not done, per message: tags, the job records, one current document."""
    problems = []
    for message in messages:
        names = whitenote_huey.message_tag_names(message.id)
        wanted = whitenote_huey.document_text(message.content, names)
        tagged, synced = job_state('auto-tag', message.id), job_state('sync-ragflow', message.id)
        docs = [doc['content'] for doc in own_docs(ragflow, datasets[message.author_id], message.id)]
        if not names or (tagged.status, tagged.content_hash) != (
                'done', whitenote_huey.content_hash(message.content)):
            problems.append('%s: auto-tag %s, tags %s' % (message.id, getattr(tagged, 'status', None),
                                                         names))
        elif (getattr(synced, 'status', None), getattr(synced, 'content_hash', None), docs) != (
                'done', whitenote_huey.document_hash(wanted, datasets[message.author_id]), [wanted]):
            problems.append('%s: sync %s, %d document(s)' % (message.id, getattr(synced, 'status', None),
                                                             len(docs)))
    return problems


def wait_until_done(messages, datasets, ragflow, timeout: float = 120, sweep_env=None, cwd=None):
    """Wait for every message to be done; with ``sweep_env``, run ``whitenote-huey sweep``
    between looks instead of waiting for the periodic pass.  The tests check again once
    the consumer has stopped: a late duplicate may still be running now (harmlessly)."""
    def done() -> bool:
        if sweep_env is not None:
            assert cli(sweep_env, cwd, 'sweep').returncode == 0
        return not unfinished(messages, datasets, ragflow)
    try:
        wait_for(done, timeout=timeout, interval=2 if sweep_env else 0.2, what='every message done')
    except AssertionError:
        raise AssertionError('not done: %s' % unfinished(messages, datasets, ragflow)[:5]) from None


def model_calls(model, messages: list[Message]) -> dict[str, int]:
    """How many times the model was asked to tag each message."""
    by_content = {message.content: message.id for message in messages}
    calls = dict.fromkeys(by_content.values(), 0)
    for request in model.chat_requests():
        message_id = by_content.get(request.json['messages'][-1]['content'])
        if message_id is not None:
            calls[message_id] += 1
    return calls


def test_a_consumer_killed_while_the_model_answers_loses_nothing(start_consumer, crash_env, model, ragflow, tmp_path):
    datasets = people(model, ragflow)
    model.default = tags('alpha', 'beta', delay=0.3)
    first = started(start_consumer('-w', '4', '-k', 'thread', log='first'))
    messages = write(datasets, 50)
    enqueue_in_subprocess(crash_env, str(tmp_path), pairs(messages))
    wait_for(lambda: len(model.chat_requests()) >= 12, what='the consumer to be busy')
    first.stop(signal.SIGKILL)  # a request has just reached the model: it is answering
    assert first.process.returncode == -signal.SIGKILL
    cut_off = models.JobState.select().where(models.JobState.status == 'running').count()
    assert cut_off >= 1
    second = start_consumer('-w', '4', '-k', 'thread', log='second')
    try:
        wait_until_done(messages, datasets, ragflow)
    finally:
        second.stop()
    assert unfinished(messages, datasets, ragflow) == []
    calls = model_calls(model, messages)
    assert max(calls.values()) <= 2 and min(calls.values()) == 1
    assert '[sweep] after-leases pass' in second.log()


@POSTGRESQL_ONLY
def test_redis_killed_and_restarted_empty_with_200_in_flight(start_consumer, crash_env, redis_server, model,
                                                            ragflow, tmp_path):
    datasets = people(model, ragflow)
    model.default = tags('alpha', 'beta', delay=0.05)
    consumer = started(start_consumer('-w', '4', '-k', 'thread'))
    try:
        messages = write(datasets, 200)
        enqueue_in_subprocess(crash_env, str(tmp_path), pairs(messages))
        wait_for(lambda: len(model.chat_requests()) >= 20, what='the consumer to be busy')
        redis_server.kill()
        wait_for(lambda: 'Error reading from queue' in consumer.log(), what='the consumer to notice')
        redis_server.start()
        assert redis_server.client().dbsize() == 0  # the queue is gone
        wait_until_done(messages, datasets, ragflow, sweep_env=crash_env, cwd=str(tmp_path))
        assert consumer.process.poll() is None  # it never exited
    finally:
        consumer.stop()
    assert unfinished(messages, datasets, ragflow) == []
    assert max(model_calls(model, messages).values()) <= 2


def test_flushall_with_100_jobs_queued(start_consumer, crash_env, redis_server, model, ragflow, tmp_path):
    datasets = people(model, ragflow)
    messages = write(datasets, 100)
    enqueue_in_subprocess(crash_env, str(tmp_path), pairs(messages))
    client = redis_server.client()
    assert client.zcard(whitenote_huey.huey.storage.queue_key) == 100  # auto-tags; syncs follow them
    client.flushall()
    time.sleep(0.5)  # SWEEP_GRACE_SECONDS: the messages are the sweep's now
    consumer = start_consumer('-w', '4', '-k', 'thread', '-n')
    try:  # -n: no periodic task, so the start-up pass alone finds them
        wait_until_done(messages, datasets, ragflow)
    finally:
        consumer.stop()
    assert unfinished(messages, datasets, ragflow) == []
    assert re.search(r'\[sweep\] start-up pass: \d+ job\(s\) enqueued \(0 lost runs, 100 new', consumer.log())
    assert max(model_calls(model, messages).values()) == 1


def insert_in_sql(db, author_id: str, message_id: str, content: str) -> None:
    """A message as the web app writes it, with plain SQL, enqueuing nothing."""
    sql = ('INSERT INTO "Message" ("id", "content", "authorId", "createdAt", "updatedAt") '
           'VALUES (%s, %s, %s, %s, %s)')
    now = models.utcnow()
    db.handle.execute_sql(sql.replace('%s', '?' if db.kind == 'sqlite' else '%s'),
                          (message_id, content, author_id, now, now))


@POSTGRESQL_ONLY
def test_redis_down_while_messages_are_written(start_consumer, db, crash_env, redis_server, model, ragflow, tmp_path):
    datasets = people(model, ragflow, 2)
    consumer = started(start_consumer('-w', '4', '-k', 'thread'))
    try:
        redis_server.kill()
        messages = write(datasets, 10)
        calls = enqueue_in_subprocess(crash_env, str(tmp_path), pairs(messages))
        assert [enqueued for enqueued, _ in calls] == [[]] * 10  # no exception, nothing enqueued
        assert max(seconds for _, seconds in calls) < 10  # generous: the connect timeout is 2 s
        for n, author_id in enumerate(list(datasets) * 5):
            message_id = models.new_id()
            insert_in_sql(db, author_id, message_id, 'written in SQL %d' % n)
            messages.append(Message.get_by_id(message_id))
        redis_server.start()
        wait_until_done(messages, datasets, ragflow, sweep_env=crash_env, cwd=str(tmp_path))
        assert consumer.process.poll() is None
    finally:
        consumer.stop()
    assert len(messages) == 20 and unfinished(messages, datasets, ragflow) == []


@POSTGRESQL_ONLY
def test_sigterm_during_a_job_loses_nothing(start_consumer, crash_env, model, ragflow, tmp_path):
    datasets = people(model, ragflow, 2)
    messages = write(datasets, 6)
    model.default = tags('alpha', 'beta', delay=1.5)
    env = dict(os.environ, **crash_env, WORKERS='2', SHUTDOWN_TIMEOUT='0.5',
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
    enqueue_in_subprocess(crash_env, str(tmp_path), pairs(messages))
    with open(tmp_path / 'run.log', 'wb') as log:
        process = subprocess.Popen([os.path.join(ROOT, 'run_consumer.sh')], cwd=str(tmp_path),
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: len(model.chat_requests()) >= 2, what='jobs to reach the model')
            process.send_signal(signal.SIGTERM)  # as systemd stops it
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
    assert 'Shutdown timeout of 0.5s elapsed' in (tmp_path / 'run.log').read_text()
    assert models.JobState.select().where(models.JobState.status == 'running').count() >= 1
    model.default = tags('alpha', 'beta')
    consumer = start_consumer('-w', '2', '-k', 'thread')
    try:  # what was queued runs, what was cut off runs again once its lease is out
        wait_until_done(messages, datasets, ragflow)
    finally:
        consumer.stop()
    assert unfinished(messages, datasets, ragflow) == []
    assert max(model_calls(model, messages).values()) <= 2


@POSTGRESQL_ONLY
def test_two_consumers_scheduling_periodic_tasks_make_one_briefing_each(start_consumer, db, redis_server,
                                                                      model):
    """Over a real briefing time (the scheduler checks periodic tasks once a minute, so
    this test takes a minute): one briefing per user; the periodic sweep runs too."""
    if datetime.datetime.now().second > 45:  # start well before the minute turns
        time.sleep(61 - datetime.datetime.now().second)
    at = models.utcnow() + datetime.timedelta(minutes=1)  # the next minute, UTC (the zone here)
    day = at.date() - datetime.timedelta(days=1)  # what a briefing at that time covers
    users = [make_user(config=model_config(model, briefing_time=at.strftime('%H:%M'),
                                           enable_auto_tag=False)) for _ in range(3)]
    for user in users:
        make_message(user, 'a note of the day before', datetime.datetime.combine(day, datetime.time(12)))
    model.default = lambda request: (tags('alpha') if 'You tag short personal notes' in request.prompt
                                     else text(ANSWER, delay=0.3))
    consumers = [start_consumer('-w', '4', '-k', 'thread', log='consumer%d' % n) for n in (1, 2)]
    try:
        for consumer in consumers:
            started(consumer)
        tagger = make_user(config=model_config(model, enable_briefing=False))
        late = models.new_id()
        insert_in_sql(db, tagger.id, late, 'written in SQL after the start-up passes')
        wait_for(lambda: all(getattr(Briefing.get_or_none((Briefing.user_id == user.id)
                                                          & (Briefing.day == day)), 'status', '')
                             == 'done' for user in users), timeout=150, what='the briefings')
        wait_for(lambda: getattr(job_state('auto-tag', late), 'status', '') == 'done',
                 timeout=60, what='the periodic sweep to find the message written in SQL')
        for consumer in consumers:  # both have scheduled the briefings at the briefing time
            wait_for(lambda consumer=consumer: consumer.log().count(
                'Enqueueing periodic task whitenote_huey.schedule_briefings') >= 2,
                what='the second periodic tick')
        queue = redis_server.client()
        wait_for(lambda: queue.zcard(whitenote_huey.huey.storage.queue_key) == 0
                 and not Briefing.select().where(Briefing.status == 'running').exists(),
                 what='what the later tick enqueued to have run')
    finally:
        for consumer in consumers:
            consumer.stop()
    for user in users:
        briefings = (Message
                     .select()
                     .where((Message.author == user.id)
                            & Message.content.startswith(whitenote_huey.BRIEFING_TITLE)))
        assert briefings.count() == 1
    assert len(model.chat_requests()) == len(users) + 1  # one briefing each, one tagging
    logs = ''.join(consumer.log() for consumer in consumers)
    assert '[sweep] periodic pass: 1 job(s) enqueued' in logs


@POSTGRESQL_ONLY
def test_backoff_measured_on_the_real_consumer(start_consumer, crash_env, model, tmp_path):
    """Three retries with growing, jittered delays, then a Retry-After honoured."""
    user = make_user(config=model_config(model, enable_briefing=False))
    flaky = make_message(user, 'fails three times')
    limited = make_message(user, 'rate limited once')
    failures = {flaky.content: [error(503)] * 3, limited.content: [error(429, retry_after=3)]}

    def answer(request):
        script = failures[request.json['messages'][-1]['content']]
        return script.pop(0) if script else tags('alpha')

    model.default = answer  # the start-up passes enqueue both messages, once
    consumer = start_consumer('-w', '2', '-k', 'thread', '-n',
                              env=dict(crash_env, SWEEP_REQUEUE_SECONDS='60'))
    try:
        wait_for(lambda: all(getattr(job_state('auto-tag', m.id), 'status', '') == 'done'
                             for m in (flaky, limited)), timeout=60, what='both messages tagged')
    finally:
        consumer.stop()
    times = {m.content: [r.time for r in model.chat_requests() if r.json['messages'][-1]['content']
                         == m.content] for m in (flaky, limited)}
    gaps = [b - a for a, b in zip(times[flaky.content], times[flaky.content][1:], strict=False)]
    planned = [float(delay) for delay in re.findall(
        r'\[auto-tag\] %s will retry in ([\d.]+)s' % flaky.id, consumer.log())]
    assert len(gaps) == len(planned) == 3
    base = whitenote_huey.RETRY_DELAY
    assert all(delay >= base * 2 ** n for n, delay in enumerate(planned))  # growing ...
    assert planned[0] < planned[1] < planned[2]
    assert [delay / (base * 2 ** n) for n, delay in enumerate(planned)] != [1.0, 1.0, 1.0]  # ... jittered
    assert all(gap >= delay - 0.05 for gap, delay in zip(gaps, planned, strict=True))  # measured (logged as %.1f)
    [first, second] = times[limited.content]
    assert second - first >= 3.0
    assert '[auto-tag] %s will retry in 3.0s' % limited.id in consumer.log()
