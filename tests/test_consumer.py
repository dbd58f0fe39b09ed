"""End to end through the real huey_consumer, the command line and run_consumer.sh."""
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from fake_model import FakeModel
from fake_model import tags
from services import ROOT
from services import Consumer
from services import cli
from services import job_state
from services import tag_names
from services import wait_for
from services import worker_env


def insert_message_with_sql(db, user_id: str, message_id: str, content: str, config: dict) -> None:
    """Rows as the web app writes them, with plain SQL (no worker code involved)."""
    statements = [
        ('INSERT INTO "User" ("id", "email", "passwordHash", "updatedAt") '
         'VALUES (%s, %s, %s, CURRENT_TIMESTAMP)', (user_id, user_id + '@example.org', 'x')),
        ('INSERT INTO "AiConfig" ("id", "userId", "openaiBaseUrl", "openaiApiKey", "updatedAt") '
         'VALUES (%s, %s, %s, %s, CURRENT_TIMESTAMP)',
         ('cfg' + user_id, user_id, config['base_url'], config['api_key'])),
        ('INSERT INTO "Message" ("id", "content", "authorId", "updatedAt") '
         'VALUES (%s, %s, %s, CURRENT_TIMESTAMP)', (message_id, content, user_id)),
    ]
    placeholder = '?' if db.kind == 'sqlite' else '%s'
    for sql, params in statements:
        db.handle.execute_sql(sql.replace('%s', placeholder), params)


def test_auto_tag_called_in_process_runs_on_the_consumer(db, redis_queue, tmp_path):
    import whitenote_huey
    with FakeModel(api_key='sk-e2e-key-000') as model:
        model.respond(tags('consumer', 'e2e'))
        insert_message_with_sql(db, 'u1', 'm1', 'end to end', {'base_url': model.url,
                                                              'api_key': model.api_key})
        consumer = Consumer(worker_env(db, redis=True), str(tmp_path)).start()
        try:
            whitenote_huey.auto_tag('u1', 'm1')
            wait_for(lambda: tag_names('m1') == ['consumer', 'e2e'], what='tags from the consumer')
        finally:
            consumer.stop()
        assert job_state('auto-tag', 'm1').status == 'done'
        assert 'sk-e2e-key-000' not in consumer.log()
        assert '[auto-tag] m1 done' in consumer.log()


@pytest.mark.parametrize('redis', [True, False], ids=['redis', 'embedded-queue'])
def test_command_line_enqueue_runs_on_the_consumer(db, tmp_path, redis):
    if redis:
        import services
        services.require('redis', bool(os.environ.get('REDIS_URL')))
    with FakeModel(api_key='sk-e2e-key-001') as model:
        insert_message_with_sql(db, 'u2', 'm2', 'from the shell', {'base_url': model.url,
                                                                  'api_key': model.api_key})
        env = worker_env(db, redis)
        consumer = Consumer(env, str(tmp_path)).start()
        try:
            result = cli(env, str(tmp_path), 'enqueue', 'auto-tag', 'm2')
            assert result.returncode == 0, result.stderr
            wait_for(lambda: tag_names('m2') == ['alpha', 'beta'], what='tags from the consumer')
        finally:
            consumer.stop()
        missing = cli(env, str(tmp_path), 'enqueue', 'auto-tag', 'no-such-message')
        assert missing.returncode == 1 and 'no message' in missing.stderr


def test_sigterm_through_run_consumer_sh_lets_the_running_job_finish(db, redis_queue, tmp_path):
    import whitenote_huey
    with FakeModel(api_key='sk-e2e-key-002') as model:
        model.respond(tags('finished', delay=1.5))
        insert_message_with_sql(db, 'u3', 'm3', 'slow job', {'base_url': model.url,
                                                            'api_key': model.api_key})
        env = dict(os.environ, **worker_env(db, redis=True), WORKERS='2',
                   PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
        log = open(tmp_path / 'run.log', 'wb')
        process = subprocess.Popen([os.path.join(ROOT, 'run_consumer.sh')], cwd=str(tmp_path),
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            whitenote_huey.auto_tag('u3', 'm3')
            wait_for(lambda: model.chat_requests(), what='the job to reach the model')
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
        assert tag_names('m3') == ['finished']
        assert job_state('auto-tag', 'm3').status == 'done'


def test_embedded_defaults_need_no_server(tmp_path):
    """No DATABASE_URL, no REDIS_URL, no key: init-db, enqueue, consumer, offline tags."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('DATABASE_URL', 'REDIS_URL', 'OPENAI_API_KEY', 'WHITENOTE_SECRET')}
    env['PYTHONPATH'] = ROOT
    run = lambda *args: subprocess.run([sys.executable, '-m', 'whitenote_huey', *args],  # noqa: E731
                                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run('init-db').returncode == 0
    assert 'exist already' in run('init-db').stdout
    conn = sqlite3.connect(tmp_path / 'whitenote.db')
    conn.execute('INSERT INTO "User" ("id", "email", "passwordHash", "updatedAt") '
                 "VALUES ('u4', 'u4@example.org', 'x', CURRENT_TIMESTAMP)")
    conn.execute('INSERT INTO "Message" ("id", "content", "authorId", "updatedAt") '
                 "VALUES ('m4', 'offline #standalone note', 'u4', CURRENT_TIMESTAMP)")
    conn.commit()
    assert run('enqueue', 'auto-tag', 'm4').returncode == 0
    process = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), 'huey_consumer'),
                                'whitenote_huey.huey', '-w', '1'], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        query = ('SELECT t."name" FROM "MessageTag" mt JOIN "Tag" t ON t."id" = mt."tagId" '
                 "WHERE mt.\"messageId\" = 'm4'")
        wait_for(lambda: conn.execute(query).fetchall() == [('standalone',)], what='offline tag')
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
    assert (tmp_path / 'whitenote-queue.db').exists()
    assert oct((tmp_path / '.whitenote-secret').stat().st_mode)[-3:] == '600'


def test_run_consumer_sh_runs_greenlet_workers(db, redis_queue, tmp_path):
    """WORKER_TYPE=greenlet starts the consumer under gevent's patches; jobs run and finish."""
    pytest.importorskip('gevent', reason="greenlet workers need gevent: pip install '.[greenlet]'")
    import whitenote_huey
    with FakeModel(api_key='sk-e2e-key-003') as model:
        model.default = tags('green', delay=1.0)
        for n in range(3):
            insert_message_with_sql(db, 'u5-%d' % n, 'm5-%d' % n, 'greenlet job %d' % n,
                                    {'base_url': model.url, 'api_key': model.api_key})
        env = dict(os.environ, **worker_env(db, redis=True), WORKERS='3', WORKER_TYPE='greenlet',
                   PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
        log = open(tmp_path / 'run.log', 'wb')
        process = subprocess.Popen([os.path.join(ROOT, 'run_consumer.sh')], cwd=str(tmp_path),
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            for n in range(3):
                whitenote_huey.auto_tag('u5-%d' % n, 'm5-%d' % n)
            wait_for(lambda: all(tag_names('m5-%d' % n) == ['green'] for n in range(3)),
                     what='tags from greenlet workers')
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
        output = (tmp_path / 'run.log').read_text()
        assert 'started with 3 greenlet' in output, output[-2000:]
        assert 'monkey-patch has not been applied' not in output
        assert all(job_state('auto-tag', 'm5-%d' % n).status == 'done' for n in range(3))
        # All three wait on the model together: unpatched greenlets would take turns,
        # each request arriving only once the one before had its answer (1 s later).
        starts = sorted(request.time for request in model.chat_requests())
        assert starts[-1] - starts[0] < 1.0, starts


@pytest.mark.parametrize('worker_type', ['thread', 'process'])
def test_one_start_up_pass_per_consumer_whatever_the_workers(db, redis_queue, tmp_path, worker_type):
    """Huey runs start-up hooks in every worker; the start-up sweep runs once per consumer."""
    env = dict(os.environ, **worker_env(db, redis=True), WORKERS='3', WORKER_TYPE=worker_type,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
    log_path = tmp_path / 'run.log'
    with open(log_path, 'wb') as log:
        process = subprocess.Popen([os.path.join(ROOT, 'run_consumer.sh')], cwd=str(tmp_path),
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: '[sweep] start-up pass' in log_path.read_text(), what='the start-up pass')
        wait_for(lambda: log_path.read_text().count('started with 3 %s' % worker_type) == 1,
                 what='the consumer to start its workers')
        time.sleep(2)  # time for other workers' passes, were there any
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert log_path.read_text().count('[sweep] start-up pass') == 1, log_path.read_text()[-3000:]
