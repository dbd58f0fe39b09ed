"""Beside a real WhiteNote: its .env and DATABASE_URL as the web app reads them, and the
worker's own state out of the web app's schema (PostgreSQL) or file (SQLite)."""
import os
import sqlite3
import threading

import psycopg2
import pytest
import services
from services import cli
from services import make_message
from services import make_user
from services import subprocess_env
from services import tag_names
from test_setup import run_python

import models
import whitenote_huey

WEBAPP_TABLES = {model._meta.table_name for model in models.WEBAPP_MODELS}
WORKER_TABLES = {model._meta.table_name for model in models.WORKER_MODELS}


def pg_tables(url: str, schema: str) -> set[str]:
    conn = psycopg2.connect(whitenote_huey.postgres_url_parts(url)[0])
    try:
        with conn.cursor() as cursor:
            cursor.execute('SELECT tablename FROM pg_tables WHERE schemaname = %s', (schema,))
            return {name for name, in cursor.fetchall()}
    finally:
        conn.close()


def sqlite_tables(path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {name for name, in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()


# The web app's .env.

def test_the_web_apps_env_file_is_read_after_the_workers_own(tmp_path):
    webapp = tmp_path / 'whitenote'
    webapp.mkdir()
    (webapp / '.env').write_text(
        '# as the web app writes it\n'
        'DATABASE_URL="postgresql://myuser:mypassword@localhost:5925/whitenote?schema=public"\n'
        'REDIS_URL="redis://localhost:16379"\n'
        'OPENAI_MODEL="gpt-4"\n'
        'RAGFLOW_API_KEY="ragflow-your-api-key-here"\n'
        'ENCRYPTION_KEY="from-the-web-app"\n'
        'AUTO_TAG_MODEL="web-app-tag-model"\n')
    worker = tmp_path / 'worker'
    worker.mkdir()
    (worker / '.env').write_text('WHITENOTE_ENV_FILE=%s\nAUTO_TAG_MODEL=worker-tag-model\n' % (webapp / '.env'))
    code = ('import whitenote_huey as w; s = w.settings; print(s.database_url, s.redis_url, s.briefing_model, '
            's.auto_tag_model, s.encryption_secret)')
    result = run_python(code, worker)
    assert result.stdout.split() == [
        'postgresql://myuser:mypassword@localhost:5925/whitenote?schema=public', 'redis://localhost:16379',
        'gpt-4', 'worker-tag-model', 'from-the-web-app'], result.stderr
    assert run_python(code, worker, OPENAI_MODEL='from-env').stdout.split()[2] == 'from-env'
    missing = run_python(code, worker, WHITENOTE_ENV_FILE=str(tmp_path / 'nowhere' / '.env'))
    assert missing.returncode != 0 and 'WHITENOTE_ENV_FILE' in missing.stderr
    assert 'Traceback' not in missing.stderr


def test_openai_model_is_the_fallback_model_name():
    load = whitenote_huey.load_settings
    assert load({}).bullmq_queue == 'whitenote-tasks' and load({'BULLMQ_QUEUE': ' '}).bullmq_queue == ''
    assert (load({}).auto_tag_model, load({}).briefing_model) == ('gpt-3.5-turbo', 'gpt-3.5-turbo')
    both = load({'OPENAI_MODEL': 'D/deepseek-chat'})
    assert (both.auto_tag_model, both.briefing_model) == ('D/deepseek-chat', 'D/deepseek-chat')
    own = load({'OPENAI_MODEL': 'D/deepseek-chat', 'BRIEFING_MODEL': 'gpt-4o'})
    assert (own.auto_tag_model, own.briefing_model) == ('D/deepseek-chat', 'gpt-4o')


@pytest.mark.parametrize('name, value, expected', [
    ('DATABASE_URL', 'postgresql://db/whitenote?schema=bad%20schema', 'DATABASE_URL: schema'),
    ('DATABASE_URL', 'postgresql://db/whitenote?schema=whitenote_huey', "the worker's own"),
    ('BULLMQ_QUEUE', 'has spaces', 'BULLMQ_QUEUE'),
])
def test_bad_drop_in_settings_are_named(tmp_path, name, value, expected):
    result = run_python('import whitenote_huey', tmp_path, **{name: value})
    assert result.returncode != 0 and expected in result.stderr and 'Traceback' not in result.stderr


# DATABASE_URL in Prisma's form.

def test_prisma_parameters_are_left_out_and_sslmode_kept():
    url = ('postgresql://whitenote:p%40ss@db.example.org:5432/whitenote?schema=app&connection_limit=5'
           '&pool_timeout=10&pgbouncer=true&socket_timeout=5&statement_cache_size=0&sslmode=require')
    database = whitenote_huey.connect_database(url)
    assert database.connect_params == {'host': 'db.example.org', 'port': 5432, 'user': 'whitenote',
                                       'password': 'p@ss', 'sslmode': 'require',
                                       'options': '-c search_path="app"'}


def test_a_prisma_url_names_the_web_apps_schema(postgres_url, tmp_path):
    """The web app's tables in schema "app", as ?schema=app has Prisma put them: the worker
    finds them there, and keeps its own in its schema; "app" and "public" hold nothing else."""
    url = services.create_test_database('_app')
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute('CREATE SCHEMA app')
        cursor.execute('SELECT tablename FROM pg_tables WHERE schemaname = %s', ('public',))
        for table, in cursor.fetchall():  # create_test_database put them in public: move them
            cursor.execute('ALTER TABLE public."%s" SET SCHEMA app' % table)
    conn.close()
    prisma_url = url + '?schema=app&connection_limit=3&pool_timeout=20&sslmode=disable'
    try:
        env = {'DATABASE_URL': prisma_url, 'WHITENOTE_SECRET': os.environ['WHITENOTE_SECRET']}
        init = cli(env, str(tmp_path), 'init-db')
        assert init.returncode == 0 and init.stdout.strip() == 'created: ' + ', '.join(
            model._meta.table_name for model in models.WORKER_MODELS), init.stderr
        whitenote_huey.use_database(prisma_url)
        user = make_user(config=None)
        note = make_message(user, 'in the app schema #prisma')
        whitenote_huey.auto_tag.call_local(user.id, note.id)
        assert tag_names(note.id) == ['prisma']
        assert pg_tables(url, 'app') == WEBAPP_TABLES
        assert pg_tables(url, 'public') == set()
        assert pg_tables(url, models.WORKER_SCHEMA) == WORKER_TABLES
    finally:
        whitenote_huey.use_database(os.environ['DATABASE_URL'])
        services.drop_test_database(url)


def test_a_prisma_sqlite_url_is_read_from_the_working_directory(tmp_path):
    (tmp_path / 'data').mkdir()
    env = {'DATABASE_URL': 'file:./data/whitenote.db?connection_limit=1',
           'WHITENOTE_SECRET': os.environ['WHITENOTE_SECRET']}
    assert cli(env, str(tmp_path), 'init-db').returncode == 0
    assert sqlite_tables(tmp_path / 'data' / 'whitenote.db') == WEBAPP_TABLES
    assert sqlite_tables(tmp_path / 'data' / 'whitenote-huey.db') == WORKER_TABLES
    note = cli(env, str(tmp_path), 'note', '--user', 'me@example.org', 'beside the app #sqlite')
    assert note.returncode == 0, note.stderr
    assert (tmp_path / 'data' / 'whitenote-queue.db').exists()


# The worker's state, out of the web app's way.

def test_after_a_full_run_the_web_apps_schema_holds_only_its_tables(db, tmp_path):
    user = make_user(config=None)
    note = make_message(user, 'a full run #clean')
    whitenote_huey.auto_tag.call_local(user.id, note.id)
    whitenote_huey.daily_briefing.call_local(user.id, whitenote_huey.local_now().date(), manual=True)
    whitenote_huey.sweep()
    assert tag_names(note.id) == ['clean']
    if db.kind == 'postgresql':
        assert pg_tables(db.url, 'public') == WEBAPP_TABLES
        assert pg_tables(db.url, models.WORKER_SCHEMA) == WORKER_TABLES
    else:
        assert sqlite_tables(tmp_path / 'whitenote.db') == WEBAPP_TABLES
        assert sqlite_tables(tmp_path / 'whitenote-huey.db') == WORKER_TABLES


def old_install(rows: int) -> None:
    """The worker's tables where an earlier version kept them, in the web app's schema
    (file), holding ``rows`` job records, a briefing, a run and a cursor."""
    for model in models.WORKER_MODELS:
        model.drop_table()
        model._meta.schema = None
    try:
        models.database.create_tables(models.WORKER_MODELS)
        models.JobState.insert_many([{'kind': 'auto-tag', 'message_id': 'm%d' % n, 'user_id': 'u',
                                      'status': 'done', 'content_hash': 'h%d' % n} for n in range(rows)]).execute()
        models.Briefing.create(user_id='u', day='2026-11-30', status='done', message_id='b1')
        models.WorkerRun.create(name='sweep', outcome='done')
        models.SweepCursor.create(name='messages', position='m7')
    finally:
        for model in models.WORKER_MODELS:
            model._meta.schema = models.WORKER_SCHEMA


def test_an_existing_install_moves_its_tables_once_losing_nothing(db, tmp_path):
    old_install(300)
    assert models.create_tables() == []  # moved, not made
    assert models.create_tables() == []
    jobs = models.JobState.select().order_by(models.JobState.message_id)
    assert jobs.count() == 300 and {job.status for job in jobs} == {'done'}
    assert models.Briefing.get().message_id == 'b1' and models.SweepCursor.get().position == 'm7'
    assert models.WorkerRun.get().outcome == 'done'
    if db.kind == 'postgresql':
        assert pg_tables(db.url, 'public') == WEBAPP_TABLES
    else:
        assert sqlite_tables(tmp_path / 'whitenote.db') == WEBAPP_TABLES
    # Rows keep being made after the move (on PostgreSQL the sequence moved with its table).
    models.JobState.create(kind='sync-ragflow', message_id='m1', user_id='u')
    assert models.JobState.select().count() == 301


def test_an_old_table_beside_a_new_one_is_merged_in(db):
    """Tables in both places (an older worker started again meanwhile): the old rows the
    new table lacks are copied in, and the old table dropped."""
    old_install(3)
    models.database.create_tables(models.WORKER_MODELS)  # the new ones, beside them
    models.JobState.create(kind='auto-tag', message_id='m1', user_id='u', status='failed')
    assert models.create_tables() == []
    statuses = {job.message_id: job.status for job in models.JobState.select()}
    assert statuses == {'m0': 'done', 'm1': 'failed', 'm2': 'done'}
    assert not models.database.table_exists('whitenote_huey_job')


def test_consumers_starting_together_make_the_tables_once(db, tmp_path):
    """Four workers and three command lines at once, on a database without the worker's tables."""
    if db.kind == 'postgresql':
        models.database.execute_sql('DROP SCHEMA "%s" CASCADE' % models.WORKER_SCHEMA)
    else:
        for model in models.WORKER_MODELS:
            model.drop_table()
    models.database.close()
    errors, barrier = [], threading.Barrier(4)

    def start() -> None:
        try:
            with models.database.connection_context():
                barrier.wait()
                models.create_tables()
        except Exception as exc:  # what a worker's start-up hook would log
            errors.append(exc)
    threads = [threading.Thread(target=start) for _ in range(4)]
    env = {k: v for k, v in subprocess_env({'DATABASE_URL': db.url}).items()}
    import subprocess
    import sys
    commands = [subprocess.Popen([sys.executable, '-m', 'whitenote_huey', 'init-db'], cwd=str(tmp_path), env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outputs = [command.communicate(timeout=60) for command in commands]
    assert errors == []
    assert all(command.returncode == 0 for command in commands), outputs
    assert set(models.database.get_tables(schema=models.WORKER_SCHEMA)) == WORKER_TABLES


@pytest.mark.parametrize('mode', ['wal', 'delete'])
def test_the_journal_mode_of_the_apps_file_is_left_as_it_was(tmp_path, mode):
    path = tmp_path / 'whitenote.db'
    conn = sqlite3.connect(path)
    assert conn.execute('PRAGMA journal_mode = %s' % mode).fetchone() == (mode,)
    conn.executescript(open(services.SCHEMA_SQL).read())
    conn.close()
    url = 'sqlite:///%s' % path
    try:
        whitenote_huey.use_database(url)
        models.create_tables()
        user = make_user(config=None)
        whitenote_huey.auto_tag.call_local(user.id, make_message(user, 'journal #mode').id)
        whitenote_huey.daily_briefing.call_local(user.id, whitenote_huey.local_now().date(), manual=True)
        models.database.close()
    finally:
        whitenote_huey.use_database(os.environ['DATABASE_URL'])
    for file, expected in ((path, mode), (tmp_path / 'whitenote-huey.db', 'delete')):
        conn = sqlite3.connect(file)
        assert conn.execute('PRAGMA journal_mode').fetchone() == (expected,), file
        conn.close()
