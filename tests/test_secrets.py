"""No secret at rest or in logs: a full run with marker keys, then a search of everything.

The run goes through a real huey_consumer on a redis-server of the test's own (so every
key in it can be read) with API keys for the model and RAGFlow that are unique markers,
in users' AI settings and in the environment.  The fakes misbehave the way real servers
do, including error messages that repeat the key they were sent.  Afterwards no marker
may be in any log line, any Redis key or value (also in its append-only file), any row
the worker writes (all columns) or any stored error.
"""
import collections
import datetime
import json
import os
import secrets
import subprocess
import sys
import threading

import redis
from fake_model import FakeModel
from fake_model import error
from fake_model import tags
from fake_model import text
from fake_ragflow import FakeRagflow
from services import Consumer
from services import RedisServer
from services import cli
from services import drain
from services import make_message
from services import make_user
from services import subprocess_env
from services import wait_for

import models
import whitenote_huey

DAY = datetime.date(2025, 6, 1)  # the briefing the consumer makes
EARLIER = datetime.date(2025, 5, 31)  # the briefing the command line makes


WEB_APP = """
import datetime, json, logging, sys
import whitenote_huey
logging.basicConfig(level='DEBUG')
jobs = json.loads(sys.argv[1])
for user_id, message_id in jobs['messages']:
    print(whitenote_huey.enqueue_message_jobs(user_id, message_id))
for user_id in jobs['briefings']:
    whitenote_huey.daily_briefing(user_id, datetime.date.fromisoformat(jobs['day']))
"""


def marker(name: str) -> str:
    """A key no redaction pattern knows: only the worker's own care keeps it out."""
    return 'zq%s%s' % (name, secrets.token_hex(8))


def noon(day: datetime.date) -> datetime.datetime:
    return datetime.datetime.combine(day, datetime.time(12))


def redis_contents(url: str) -> list[bytes]:
    """Every key and value in every database of the Redis at ``url``, whatever their type."""
    found = []
    admin = redis.Redis.from_url(url)
    for name in admin.info('keyspace'):
        conn = redis.Redis.from_url(url, db=int(name[2:]))
        for key in conn.scan_iter(count=1000):
            kind = conn.type(key).decode()
            found.append(key)
            if kind == 'string':
                found.append(conn.get(key))
            elif kind == 'list':
                found += conn.lrange(key, 0, -1)
            elif kind == 'set':
                found += conn.smembers(key)
            elif kind == 'zset':
                found += conn.zrange(key, 0, -1)
            elif kind == 'hash':
                found += [part for item in conn.hgetall(key).items() for part in item]
            elif kind == 'stream':
                found += [repr(entry).encode() for entry in conn.xrange(key)]
            elif kind != 'none':  # 'none': gone since the scan
                raise AssertionError('unexpected Redis type %s of %r' % (kind, key))
            found.append(conn.dump(key) or b'')
    return found


def queued_messages(url: str, serializer) -> list:
    """The task messages in the queue and the schedule, unpickled (they are ours, signed)."""
    conn, name = redis.Redis.from_url(url), whitenote_huey.settings.queue_name
    data = [item[8:] for item in conn.zrange('huey.redis.%s' % name, 0, -1)]  # 8-byte prefix
    data += conn.zrange('huey.schedule.%s' % name, 0, -1)
    return [serializer.deserialize(item) for item in data]


def hostile_model(keys: set):
    """Answers keys in ``keys``; a wrong key gets OpenAI's 401 with the key repeated.
    The first request for a note saying "flaky" gets a 500 that repeats the key."""
    seen, lock = collections.Counter(), threading.Lock()

    def reply(request):
        key = request.headers.get('authorization', '').removeprefix('Bearer ')
        if key not in keys:
            return error(401, 'Incorrect API key provided: %s.' % key, code='invalid_api_key')
        with lock:
            seen[request.prompt] += 1
            first = seen[request.prompt] == 1
        if first and 'flaky' in request.prompt:
            return error(500, 'upstream refused key %s, try again' % key)
        if 'You tag short personal notes' in request.prompt:
            return tags('keyless')
        return text('A quiet day.')
    return reply


def test_no_key_in_logs_redis_or_tables_after_a_full_run(db, tmp_path, caplog):
    caplog.set_level('DEBUG')
    run_dir = tmp_path / 'run'  # all the run writes, apart from the database
    (run_dir / 'redis').mkdir(parents=True)
    keys = {name: marker(name) for name in (
        'usermodel', 'envmodel', 'wrongmodel', 'userragflow', 'envragflow', 'otherragflow')}
    with RedisServer(str(run_dir / 'redis'), '--appendonly', 'yes') as server, \
            FakeModel() as model, FakeRagflow() as ragflow:
        url = 'redis://127.0.0.1:%d/0' % server.port
        model.default = hostile_model({keys['usermodel'], keys['envmodel']})
        env_dataset = ragflow.add_dataset(keys['envragflow'])
        alice_dataset = ragflow.add_dataset(keys['userragflow'])
        carol_dataset = ragflow.add_dataset(keys['otherragflow'])
        env = {'DATABASE_URL': db.url, 'REDIS_URL': url, 'LOG_LEVEL': 'DEBUG',
               'WHITENOTE_SECRET': os.environ['WHITENOTE_SECRET'],
               'OPENAI_API_KEY': keys['envmodel'], 'OPENAI_BASE_URL': model.url,
               'RAGFLOW_BASE_URL': ragflow.url, 'RAGFLOW_API_KEY': keys['envragflow'],
               'RAGFLOW_DATASET_ID': env_dataset}
        # Alice has keys of her own; Bob none (the environment's are used); Carol's model
        # key is refused and her dataset answers "API key <key> is invalid!".
        alice = make_user(config=dict(
            openai_base_url=model.url, openai_api_key=keys['usermodel'], ragflow_base_url=ragflow.url,
            ragflow_api_key=keys['userragflow'], ragflow_dataset_id=alice_dataset))
        bob = make_user(config=None)
        carol = make_user(config=dict(
            openai_base_url=model.url, openai_api_key=keys['wrongmodel'], ragflow_base_url=ragflow.url,
            ragflow_api_key=keys['otherragflow'], ragflow_dataset_id=carol_dataset))
        notes = [make_message(user, '%s %s note' % (word, user.email), noon(DAY))
                 for user, word in ((alice, 'flaky'), (bob, 'flaky'), (carol, 'plain'))]
        make_message(alice, 'an earlier note', noon(EARLIER))
        make_message(carol, 'an earlier note', noon(EARLIER))
        ragflow.fail_next('http500', path_contains=alice_dataset)
        ragflow.fail_next('retry_after', path_contains=env_dataset, seconds=1)
        ragflow.fail_next('auth', times=100, path_contains=carol_dataset,
                          message='API key %s is invalid!' % keys['otherragflow'])

        caplog.clear()  # the test wrote the users' keys as the web app does; now the run

        # Everything is enqueued before the consumer starts, to read every task message:
        # by a Python web app's calls, and by the command line.
        jobs = {'messages': [[note.author_id, note.id] for note in notes], 'day': DAY.isoformat(),
                'briefings': [user.id for user in (alice, bob, carol)]}
        outputs = [subprocess.run([sys.executable, '-c', WEB_APP, json.dumps(jobs)], cwd=str(run_dir),
                                  env=subprocess_env(env), capture_output=True, text=True, timeout=60),
                   cli(env, str(run_dir), 'enqueue', 'auto-tag', notes[0].id)]
        assert outputs[0].stdout.split('\n')[:3] == ["['auto-tag', 'sync-ragflow']"] * 3, outputs[0].stderr
        messages = queued_messages(url, whitenote_huey.huey.serializer)
        assert len(messages) == 7  # 3 auto-tags (each enqueues its sync when it ends), 3 briefings, 1
        for message in messages:  # task arguments are ids and a day, never a key
            assert all(type(arg) in (str, datetime.date) for arg in message.args), message
            assert not message.kwargs
        seen = redis_contents(url)

        def outcomes():
            seen.extend(redis_contents(url))
            jobs = {(row.kind, row.user_id): row.status for row in models.JobState.select()}
            days = {row.user_id: row.status for row in models.Briefing.select()
                    .where(models.Briefing.day == DAY)}
            return jobs, days

        expected = ({(kind, user.id): status for user, status in ((alice, 'done'), (bob, 'done'),
                                                                  (carol, 'failed'))
                     for kind in ('auto-tag', 'sync-ragflow')},
                    {alice.id: 'done', bob.id: 'done', carol.id: 'failed'})
        consumer = Consumer(env, str(run_dir), '-w', '2', '-k', 'thread', '-v').start()
        try:
            wait_for(lambda: outcomes() == expected, timeout=60, what='every job to end')
        finally:
            assert consumer.stop() == 0
        outputs.append(cli(env, str(run_dir), 'briefing', '--date', DAY.isoformat()))
        seen += redis_contents(url)
        assert models.Briefing.get(models.Briefing.user_id == alice.id, models.Briefing.day == EARLIER) \
            .status == 'done'

    # What was searched must hold what a leak would ride on.
    log = consumer.log()
    assert 'will retry' in log and 'HTTP 500' in log and 'HTTP 429' in log and 'HTTP 401' in log
    assert 'Incorrect API key provided: ***.' in log and 'upstream refused key ***' in log
    assert 'authentication error (code 109): API key *** is invalid!' in log
    assert 'enqueued auto-tag' in outputs[1].stdout
    assert 'HTTP 401' in outputs[2].stdout and 'DEBUG' in outputs[2].stderr
    sources = {'consumer log': log, 'test process log': caplog.text}
    for name, result in zip(('web app', 'enqueue command', 'briefing command'), outputs, strict=True):
        sources[name] = result.stdout + result.stderr
    sources['redis'] = b'\n'.join(seen).decode('utf-8', 'replace')
    sources['task messages'] = repr(messages)
    for path in sorted(run_dir.rglob('*')):  # the append-only file, redis.log, consumer.log
        if path.is_file():
            sources[str(path.relative_to(run_dir))] = path.read_bytes().decode('utf-8', 'replace')
    assert any(name.startswith('redis/appendonlydir/') for name in sources)
    assert notes[2].id in sources['redis'] and notes[2].id in sources['redis/appendonlydir/%s' % next(
        path.name for path in (run_dir / 'redis' / 'appendonlydir').glob('*.incr.aof'))]
    for model_class in models.WEBAPP_MODELS + models.WORKER_MODELS:
        if model_class is not models.AiConfig:  # the web app keeps the keys there, by design
            sources['table %s' % model_class._meta.table_name] = repr(list(
                model_class.select().tuples()))
    errors = [row.last_error for model_class in models.WORKER_MODELS
              for row in model_class.select() if getattr(row, 'last_error', None)]
    assert len(errors) >= 3  # Carol's auto-tag, sync and briefing
    sources['stored errors'] = '\n'.join(errors)
    leaks = [(source, name) for source, content in sources.items()
             for name, key in keys.items() if key in content]
    assert leaks == []


def test_a_key_echoed_late_in_an_error_is_masked_before_the_text_is_cut(db, redis_queue, tmp_path, caplog):
    """The model and RAGFlow repeat the key where a cut at 300 characters would keep its
    first 20 characters: masked first, no part of it is left in the record, the log or
    ``status --json``."""
    caplog.set_level('DEBUG')
    keys = {'model': marker('latemodel'), 'ragflow': marker('lateragflow')}
    with FakeModel(api_key=keys['model']) as model, FakeRagflow() as ragflow:
        # Where the error's text puts the key: so that a cut at 300 would keep 20 of its characters.
        model.default = error(401, 'x' * (300 - len('Error code: 401 - ') - 20) + keys['model'] + ' is revoked')
        dataset = ragflow.add_dataset(keys['ragflow'])
        user = make_user(config=dict(openai_base_url=model.url, openai_api_key=keys['model'],
                                     ragflow_base_url=ragflow.url, ragflow_api_key=keys['ragflow'],
                                     ragflow_dataset_id=dataset))
        ragflow.fail_next('auth', message='y' * 280 + keys['ragflow'] + ' is invalid!')
        message = make_message(user, 'a note')
        caplog.clear()  # the test wrote the keys as the web app does (logged by peewee); now the run
        whitenote_huey.auto_tag(user.id, message.id)  # its sync follows once it has failed
        drain(whitenote_huey.huey)
    errors = [state.last_error for state in models.JobState.select()]
    assert len(errors) == 2 and all('***' in text for text in errors)
    report = cli({'DATABASE_URL': db.url, 'WHITENOTE_SECRET': os.environ['WHITENOTE_SECRET']},
                 str(tmp_path), 'status', '--json')
    shown = '\n'.join(errors) + caplog.text + report.stdout + report.stderr
    assert json.loads(report.stdout)['failures']
    leaks = [name for name, key in keys.items() for start in range(len(key) - 7) if key[start:start + 8] in shown]
    assert leaks == []
