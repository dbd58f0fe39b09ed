"""Test set-up: real Redis, real PostgreSQL and SQLite, fake model and RAGFlow servers.

Redis and PostgreSQL come from TEST_REDIS_URL and TEST_DATABASE_URL (defaults: the
local servers).  When one is not reachable, the tests that need it skip and say how
to enable them; with WHITENOTE_REQUIRE_SERVICES=1 (as in CI) they fail instead.
"""
import dataclasses
import os
import sqlite3
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import services  # noqa: E402

_session_dir = tempfile.mkdtemp(prefix='whitenote-tests-')
os.environ.update({
    'DATABASE_URL': 'sqlite:///%s/import.db' % _session_dir,
    'WHITENOTE_SECRET': 'test-secret-not-for-production',
    'WHITENOTE_TIMEZONE': 'UTC',
    'HTTP_TIMEOUT': '2',
    # A queue of this run's own, so test runs sharing a Redis never take each other's jobs.
    'WHITENOTE_QUEUE': 'whitenote_test_%d' % os.getpid(),
    # The web app's BullMQ queue, of this run's own too.
    'BULLMQ_QUEUE': 'whitenote-tasks-test-%d' % os.getpid(),
})
for name in ('OPENAI_API_KEY', 'OPENAI_BASE_URL', 'OPENAI_MODEL', 'AUTO_TAG_MODEL', 'BRIEFING_MODEL',
             'RAGFLOW_BASE_URL', 'RAGFLOW_API_KEY', 'RAGFLOW_DATASET_ID', 'REDIS_URL',
             'ENCRYPTION_KEY', 'AUTH_SECRET', 'NEXTAUTH_SECRET', 'WHITENOTE_ENV_FILE'):
    os.environ.pop(name, None)
if services.redis_reachable(services.REDIS_URL):
    os.environ['REDIS_URL'] = services.REDIS_URL

from fake_model import FakeModel  # noqa: E402
from fake_ragflow import FakeRagflow  # noqa: E402

import models  # noqa: E402
import whitenote_huey  # noqa: E402


def pytest_report_header(config):
    return 'whitenote-huey tests: redis %s, postgresql %s' % (
        services.REDIS_URL if os.environ.get('REDIS_URL') else 'NOT reachable',
        services.DATABASE_URL if services.postgres_reachable() else 'NOT reachable')


@pytest.fixture(scope='session')
def postgres_url():
    """A fresh PostgreSQL database for this session with the web app's tables."""
    services.require('postgresql', services.postgres_reachable())
    url = services.create_test_database()
    yield url
    whitenote_huey.use_database(os.environ['DATABASE_URL'])
    services.drop_test_database(url)


def bind_clean_database(request, tmp_path, sqlite_schema: str, postgres_fixture: str):
    """Bind the models to a clean database of the kind ``request.param`` names: a new SQLite
    file made from ``sqlite_schema``, or the session's PostgreSQL database, emptied."""
    if request.param == 'sqlite':
        url = 'sqlite:///%s/whitenote.db' % tmp_path
        whitenote_huey.use_database(url)
        services.create_webapp_tables(models.database, sqlite_schema)
    else:
        url = request.getfixturevalue(postgres_fixture)
        whitenote_huey.use_database(url)
        services.truncate_all(models.database)
    models.create_tables()
    return services.Database(request.param, url, models.database)


@pytest.fixture(params=['sqlite', 'postgresql'])
def db(request, tmp_path):
    """The models bound to a clean database of each kind, holding the web app's tables."""
    yield bind_clean_database(request, tmp_path, services.SCHEMA_SQL, 'postgres_url')
    models.database.close()


@pytest.fixture(scope='session')
def workspaces_postgres_url():
    """A fresh PostgreSQL database for this session with WhiteNote's workspaces schema."""
    services.require('postgresql', services.postgres_reachable())
    url = services.create_test_database('_ws', services.WORKSPACES_SQL['postgresql'])
    yield url
    whitenote_huey.use_database(os.environ['DATABASE_URL'])
    services.drop_test_database(url)


@pytest.fixture(params=['sqlite', 'postgresql'])
def wdb(request, tmp_path):
    """As ``db``, on WhiteNote with workspaces (c39d8d0), as Prisma creates it on each."""
    bound = bind_clean_database(request, tmp_path, services.WORKSPACES_SQL['sqlite'],
                                'workspaces_postgres_url')
    assert models.shape() is models.WORKSPACES
    yield bound
    models.database.close()


@pytest.fixture
def today(tmp_path):
    """The models bound to today's WhiteNote on SQLite (caae1ff): the file its migration
    makes, at data/whitenote.db in the web app's folder ``tmp_path``, named as its .env
    names it (an absolute path here: the test's working directory is not that folder)."""
    (tmp_path / 'data').mkdir()
    path = tmp_path / 'data' / 'whitenote.db'
    connection = sqlite3.connect(path)
    connection.executescript(open(services.TODAY_SQL).read())
    connection.close()
    url = 'file:%s' % path
    whitenote_huey.use_database(url)
    models.create_tables()
    assert models.shape() is models.TODAY
    yield services.Database('sqlite', url, models.database)
    models.database.close()


@pytest.fixture
def redis_queue():
    """The worker's Huey instance on real Redis, emptied before and after."""
    services.require('redis', bool(os.environ.get('REDIS_URL')))
    whitenote_huey.huey.flush()
    yield whitenote_huey.huey
    whitenote_huey.huey.flush()


@pytest.fixture
def use(monkeypatch):
    """Change settings for one test."""
    def change(**changes):
        monkeypatch.setattr(whitenote_huey, 'settings', dataclasses.replace(
            whitenote_huey.settings, **changes))
    return change


@pytest.fixture
def model():
    with FakeModel(api_key='sk-test-model-key') as fake:
        yield fake


@pytest.fixture
def ragflow():
    """A fake RAGFlow server; give each user a dataset with services.ragflow_config."""
    with FakeRagflow() as fake:
        yield fake
