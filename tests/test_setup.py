"""Settings, the Huey instance, the tables and the command line."""
import os
import subprocess
import sys

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
