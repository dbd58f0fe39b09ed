"""Settings, the Huey instance, the tables and the command line."""
import dataclasses
import os
import re
import subprocess
import sys
import threading

import pytest
from huey import RedisHuey
from huey import SqliteHuey
from huey.serializer import SignedSerializer
from services import subprocess_env

import models
import whitenote_huey

CLEAN_ENV = ('DATABASE_URL', 'REDIS_URL', 'OPENAI_API_KEY', 'WHITENOTE_TIMEZONE', 'WHITENOTE_SECRET')


def run_python(code: str, cwd, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in subprocess_env({}).items() if k not in CLEAN_ENV}
    full.update(env)
    return subprocess.run([sys.executable, '-c', code], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize('name, value, expected', [
    ('DATABASE_URL', 'mysql://db/whitenote', 'DATABASE_URL'),
    ('DATABASE_URL', 'postgresql://', 'DATABASE_URL'),
    ('REDIS_URL', 'localhost:6379', 'REDIS_URL'),
    ('REDIS_URL', 'redis://127.0.0.1:99999/0', 'REDIS_URL'),
    ('OPENAI_BASE_URL', 'not a url', 'OPENAI_BASE_URL'),
    ('WHITENOTE_TIMEZONE', 'Mars/Olympus_Mons', 'WHITENOTE_TIMEZONE'),
    ('HTTP_TIMEOUT', 'soon', 'HTTP_TIMEOUT'),
    ('WHITENOTE_QUEUE', 'has spaces', 'WHITENOTE_QUEUE'),
])
def test_bad_setting_stops_the_program_naming_it(tmp_path, name, value, expected):
    result = run_python('import whitenote_huey', tmp_path, **{name: value})
    assert result.returncode != 0
    assert expected in result.stderr and 'Traceback' not in result.stderr


def test_password_in_a_bad_url_is_not_echoed(tmp_path):
    result = run_python('import whitenote_huey', tmp_path, DATABASE_URL='mysql://u:hunter2secret@db/x')
    assert 'DATABASE_URL' in result.stderr and 'hunter2secret' not in result.stderr


def test_dotenv_is_read_and_environment_wins(tmp_path):
    (tmp_path / '.env').write_text('WHITENOTE_TIMEZONE=Asia/Shanghai\nAUTO_TAG_MODEL=from-dotenv\n')
    code = 'import whitenote_huey as w; print(w.settings.timezone.key, w.settings.auto_tag_model)'
    assert run_python(code, tmp_path).stdout.split() == ['Asia/Shanghai', 'from-dotenv']
    overridden = run_python(code, tmp_path, AUTO_TAG_MODEL='from-env')
    assert overridden.stdout.split() == ['Asia/Shanghai', 'from-env']


def test_defaults_are_sqlite_files_in_the_working_directory(tmp_path):
    code = ('import whitenote_huey as w; print(isinstance(w.huey, w.SqliteHuey), '
            'w.models.database.obj.database, w.huey.storage.filename)')
    sqlite_huey, database, queue = run_python(code, tmp_path).stdout.split()
    assert sqlite_huey == 'True'
    assert database == 'whitenote.db'
    assert queue == str(tmp_path / 'whitenote-queue.db')


def test_huey_instance_is_redis_signed_and_keeps_no_results():
    if not os.environ.get('REDIS_URL'):
        pytest.skip('runs with REDIS_URL set (see conftest)')
    huey = whitenote_huey.huey
    assert isinstance(huey, RedisHuey) and not isinstance(huey, SqliteHuey)
    assert isinstance(huey.serializer, SignedSerializer)
    assert huey.results is False


def test_enqueue_message_jobs_survives_redis_down(tmp_path):
    code = ('import whitenote_huey as w, models; models.create_tables(); '
            'u = models.User.create(email="a@b.c"); m = models.Message.create(author=u, content="x"); '
            'print("result", w.enqueue_message_jobs(u.id, m.id))')
    result = run_python(code, tmp_path, REDIS_URL='redis://127.0.0.1:1/0', WHITENOTE_SECRET='s' * 32)
    assert result.returncode == 0, result.stderr
    assert 'result []' in result.stdout
    assert 'left for the sweep' in result.stderr


@pytest.mark.parametrize('command', [['whitenote-huey'], [sys.executable, '-m', 'whitenote_huey']])
def test_help_lists_the_commands(tmp_path, command):
    if command[0] == 'whitenote-huey':
        command = [os.path.join(os.path.dirname(sys.executable), 'whitenote-huey')]
        if not os.path.exists(command[0]):
            pytest.fail('whitenote-huey console script missing: run pip install -e .')
    env = {k: v for k, v in subprocess_env({}).items() if k not in CLEAN_ENV}
    result = subprocess.run(command + ['--help'], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for name in ('init-db', 'enqueue'):
        assert name in result.stdout


def test_ids_are_cuid_like_and_unique():
    ids = {models.new_id() for _ in range(10000)}
    assert len(ids) == 10000
    assert all(len(i) == 25 and i[0] == 'c' and i.isalnum() and i.islower() for i in ids)


def webapp_shape(db) -> dict:
    """Columns and indexes of the web app's tables, as the database reports them."""
    shape = {}
    for model in models.WEBAPP_MODELS:
        table = model._meta.table_name
        columns = sorted((c.name, c.data_type.lower(), c.null) for c in db.handle.get_columns(table))
        indexes = sorted((i.name, tuple(i.columns), i.unique) for i in db.handle.get_indexes(table))
        shape[table] = (columns, indexes)
    return shape


def test_models_map_the_webapp_columns_exactly(db):
    for model in models.WEBAPP_MODELS:
        table = model._meta.table_name
        in_db = {c.name for c in db.handle.get_columns(table)}
        mapped = {f.column_name for f in model._meta.sorted_fields}
        assert mapped == in_db, table


def test_create_tables_adds_only_the_workers_tables_and_alters_nothing(db):
    before = webapp_shape(db)
    for model in models.WORKER_MODELS:
        model.drop_table()
    created = models.create_tables()
    assert created and all(name.startswith('whitenote_huey_') for name in created)
    assert models.create_tables() == []
    assert webapp_shape(db) == before


def test_init_db_on_an_empty_database_creates_everything_twice_harmlessly(db, tmp_path):
    if db.kind == 'postgresql':
        for table in db.handle.get_tables():
            db.handle.execute_sql('DROP TABLE "%s" CASCADE' % table)
        db.handle.execute_sql('DROP SCHEMA "%s" CASCADE' % models.WORKER_SCHEMA)
        url = db.url
    else:
        (tmp_path / 'empty').mkdir()  # its own directory: the worker's file goes beside it
        url = 'sqlite:///%s/empty/empty.db' % tmp_path
    env = {k: v for k, v in subprocess_env({}).items() if k not in CLEAN_ENV}
    env['DATABASE_URL'] = url
    cli = [sys.executable, '-m', 'whitenote_huey', 'init-db']
    first = subprocess.run(cli, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    second = subprocess.run(cli, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    for table in ('User', 'AiConfig', 'Message', 'Tag', 'MessageTag', 'MessageVersion', 'whitenote_huey_job'):
        assert table in first.stdout
    assert 'exist already' in second.stdout
    whitenote_huey.use_database(url)
    assert set(models.database.get_tables()) >= {m._meta.table_name for m in models.WEBAPP_MODELS}
    if db.kind == 'postgresql':
        # Leave the session database as the other tests expect it.
        for table in models.database.get_tables():
            models.database.execute_sql('DROP TABLE "%s" CASCADE' % table)
        import services
        models.database.execute_sql(open(services.SCHEMA_SQL).read())
        models.create_tables()


def test_tables_made_by_an_older_worker_get_the_new_columns(db):
    """A worker table made before the owner and lost_runs columns existed gets them,
    once, and keeps its rows; a second worker adding them at the same time is no error."""
    for model, column, _ in models.ADDED_COLUMNS:
        db.handle.execute_sql('ALTER TABLE %s DROP COLUMN "%s"' % (models.qualified(model), column))
    db.handle.execute_sql('INSERT INTO ' + models.JOB_TABLE + ' ("kind", "message_id", "user_id", "status", '
                          '"attempts", "tags_added", "created_at", "updated_at") '
                          "VALUES ('auto-tag', 'm-old', 'u-old', 'done', 1, '[]', CURRENT_TIMESTAMP, "
                          'CURRENT_TIMESTAMP)')
    added = models.create_tables()
    assert sorted(added) == ['whitenote_huey_briefing.lost_runs', 'whitenote_huey_job.lost_runs',
                             'whitenote_huey_job.owner']
    assert models.create_tables() == []
    row = models.JobState.get(models.JobState.message_id == 'm-old')
    assert (row.status, row.owner, row.lost_runs) == ('done', None, 0)


# Settings that stop the start.

def env_example_secret() -> str:
    """The WHITENOTE_SECRET that .env.example shows."""
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.env.example')) as handle:
        [value] = re.findall(r'^# WHITENOTE_SECRET=(.+)$', handle.read(), re.MULTILINE)
    return value


@pytest.mark.parametrize('value, message', [
    (None, 'is a placeholder, not a secret'),
    ('CHANGE-ME', 'is a placeholder, not a secret'),
    ('s3cret', 'too short (6 characters, at least 16)'),
])
def test_a_placeholder_or_short_secret_stops_the_start(tmp_path, value, message):
    value = env_example_secret() if value is None else value
    result = run_python('import whitenote_huey', tmp_path, WHITENOTE_SECRET=value)
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert 'bad setting: WHITENOTE_SECRET: ' in result.stderr and message in result.stderr


def test_workers_starting_at_once_make_one_secret_file(tmp_path):
    """Without WHITENOTE_SECRET, 64 threads reading the key file at the same instant (a
    barrier) all get the same key and no error, and the file is whole."""
    config = dataclasses.replace(whitenote_huey.settings, secret='',
                                 database_url='sqlite:///%s/whitenote.db' % tmp_path)
    barrier = threading.Barrier(64)
    keys, errors = [], []

    def read():
        barrier.wait()
        try:
            keys.append(whitenote_huey.load_secret(config))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(keys) == 64 and len(set(keys)) == 1
    assert (tmp_path / '.whitenote-secret').read_text() == keys[0] and len(keys[0]) == 64
    assert [path.name for path in tmp_path.iterdir()] == ['.whitenote-secret']


def test_processes_starting_at_once_make_one_secret_file(tmp_path):
    """Without WHITENOTE_SECRET, 6 processes started together (each waits for a go file,
    then reads the signing key as a consumer does at its start) all run, with the same
    key, and the file is whole."""
    code = ('import hashlib, os, time\n'
            'import whitenote_huey\n'
            'while not os.path.exists("go"): time.sleep(0.005)\n'
            'whitenote_huey.huey.serializer.load_key()\n'
            'print(hashlib.sha256(whitenote_huey.huey.serializer._key).hexdigest())\n')
    env = {k: v for k, v in subprocess_env({}).items() if k not in CLEAN_ENV}
    processes = [subprocess.Popen([sys.executable, '-c', code], cwd=tmp_path, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(6)]
    (tmp_path / 'go').touch()
    results = [process.communicate(timeout=120) + (process.returncode,) for process in processes]
    assert [(code, err) for _, err, code in results if code != 0] == []
    assert len({out for out, _, _ in results}) == 1
    key = (tmp_path / '.whitenote-secret').read_text()
    assert len(key) == 64 and oct((tmp_path / '.whitenote-secret').stat().st_mode)[-3:] == '600'
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith('.whitenote-secret')] == [
        '.whitenote-secret']


def test_an_empty_secret_file_stops_the_start_saying_what_to_do(tmp_path):
    """The consumer stops at its start, and a command that enqueues stops, each naming
    the file and what to do; neither with a traceback."""
    (tmp_path / '.whitenote-secret').write_text('\n')
    env = {k: v for k, v in subprocess_env({}).items() if k not in CLEAN_ENV}
    consumer = os.path.join(os.path.dirname(sys.executable), 'huey_consumer')
    started = subprocess.run([consumer, 'whitenote_huey.huey', '-w', '1'], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    noted = subprocess.run([sys.executable, '-m', 'whitenote_huey', 'note', '--user', 'me@example.org',
                            'text'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    for result in (started, noted):
        assert result.returncode != 0 and 'Traceback' not in result.stderr
        assert 'the key file %s is empty: delete it' % (tmp_path / '.whitenote-secret') in result.stderr


NUMERIC_SETTINGS = ('HTTP_TIMEOUT', 'HTTP_MAX_BYTES', 'JOB_LEASE_SECONDS', 'JOB_MAX_LOST_RUNS', 'RAGFLOW_MAX_PAGES',
                    'SWEEP_MINUTES', 'SWEEP_LOOKBACK_HOURS', 'SWEEP_GRACE_SECONDS', 'SWEEP_REQUEUE_SECONDS',
                    'SWEEP_MAX_ENQUEUE', 'SWEEP_SCAN_BATCH', 'BRIEFING_MAX_CHARS', 'METRICS_PORT')


@pytest.mark.parametrize('value', ['nan', 'NaN', 'inf', '-inf', '1e400', '9' * 400, '1e3', '-5', '0',
                                   '１２', '٣', '²', '1\u00a02', '0x10', '1_000', '10.5.1', ''.join(['1', '\x00'])])
@pytest.mark.parametrize('name', NUMERIC_SETTINGS)
def test_numbers_that_are_not_plain_finite_ascii_stop_the_start_naming_the_setting(name, value):
    with pytest.raises(whitenote_huey.SettingsError) as refused:
        whitenote_huey.load_settings({name: value})
    assert str(refused.value).startswith(name + ': ')


@pytest.mark.parametrize('name, value', [('JOB_LEASE_SECONDS', 'inf'), ('METRICS_PORT', '８０'),
                                         ('HTTP_TIMEOUT', 'nan'), ('SWEEP_MAX_ENQUEUE', '9' * 400)])
def test_a_bad_number_stops_the_program_with_a_message(tmp_path, name, value):
    result = run_python('import whitenote_huey', tmp_path, **{name: value})
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert 'bad setting: %s: ' % name in result.stderr


def test_plain_numbers_are_read():
    config = whitenote_huey.load_settings({'HTTP_TIMEOUT': '2.5', 'SWEEP_MAX_ENQUEUE': '20', 'METRICS_PORT': '9108',
                                           'HTTP_MAX_BYTES': '4096', 'JOB_MAX_LOST_RUNS': '1'})
    assert (config.http_timeout, config.sweep_max_enqueue, config.metrics_port, config.http_max_bytes,
            config.max_lost_runs) == (2.5, 20, 9108, 4096, 1)


@pytest.mark.parametrize('url', ['sqlite://host/notes.db', 'sqlite://notes.db', 'sqlite:notes.db',
                                 'sqlite:///notes.db?mode=ro', 'sqlite:///notes.db#x'])
def test_a_sqlite_url_that_would_name_another_file_is_refused(url):
    with pytest.raises(whitenote_huey.SettingsError, match='DATABASE_URL: .* is not a SQLite URL of a file'):
        whitenote_huey.load_settings({'DATABASE_URL': url})


@pytest.mark.parametrize('url, path', [('sqlite:///notes.db', 'notes.db'), ('sqlite:////srv/wn/notes.db',
                                                                           '/srv/wn/notes.db')])
def test_a_sqlite_url_names_the_file_as_written(url, path):
    config = whitenote_huey.load_settings({'DATABASE_URL': url})
    assert whitenote_huey.sqlite_path(config.database_url) == path


def test_the_repr_of_the_settings_hides_every_secret_and_password():
    config = whitenote_huey.load_settings({
        'DATABASE_URL': 'postgresql://whitenote:db-pass-0001@db:5432/wn?sslpassword=db-pass-0002',
        'REDIS_URL': 'redis://:redis-pass-0003@cache:6379/0', 'OPENAI_API_KEY': 'openai-key-0004',
        'OPENAI_BASE_URL': 'https://user:model-pass-0005@models.example.org',
        'RAGFLOW_BASE_URL': 'https://rag:rag-pass-0006@rag.example.org', 'RAGFLOW_API_KEY': 'rag-key-0007',
        'RAGFLOW_DATASET_ID': 'dataset', 'WHITENOTE_SECRET': 'whitenote-secret-0008'})
    shown = repr(config)
    assert re.findall(r'\w+-(?:pass|key|secret)-\d{4}', shown) == []
    assert "database_url='postgresql://whitenote:***@db:5432/wn?sslpassword=***'" in shown
    assert "redis_url='redis://:***@cache:6379/0'" in shown and "openai_api_key='***'" in shown
    assert "secret='***'" in shown and "ragflow_api_key='***'" in shown
