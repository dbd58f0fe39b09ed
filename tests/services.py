"""Reaching the test services, and the helpers that prepare databases and data."""
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlparse

import pytest

REDIS_URL = os.environ.get('TEST_REDIS_URL', 'redis://127.0.0.1:6379/15')
DATABASE_URL = os.environ.get('TEST_DATABASE_URL', 'postgresql://postgres@127.0.0.1:5432/test')
REQUIRE = os.environ.get('WHITENOTE_REQUIRE_SERVICES') == '1'
SCHEMA_SQL = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'whitenote-schema.sql')
# WhiteNote with workspaces (c39d8d0), as Prisma creates it on each database.
WORKSPACES_SQL = {kind: os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                     'whitenote-workspaces-%s.sql' % kind)
                  for kind in ('postgresql', 'sqlite')}
# Today's WhiteNote on SQLite (caae1ff): its migration, and its Prisma data model.
TODAY_SQL = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'whitenote-today-sqlite.sql')
TODAY_PRISMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'whitenote-today.prisma')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOW_TO_ENABLE = {
    'redis': 'start Redis on 127.0.0.1:6379 or set TEST_REDIS_URL',
    'postgresql': 'start PostgreSQL on 127.0.0.1:5432 (user postgres, database test) '
                  'or set TEST_DATABASE_URL',
    'redis-server': 'install redis-server: the crash tests start Redis servers of their own',
    'node': "install Node.js 20 and npm: the tests enqueue with the web app's own BullMQ client "
            "(npm bullmq@5), write today's SQLite WhiteNote through its own Prisma Client 7 and make "
            'key vectors with Node\'s crypto',
}


def require(service: str, available: bool) -> None:
    """Skip (or, with WHITENOTE_REQUIRE_SERVICES=1, fail) when a service is missing."""
    if available:
        return
    message = '%s not reachable: %s' % (service, HOW_TO_ENABLE[service])
    if REQUIRE:
        pytest.fail(message + ' (WHITENOTE_REQUIRE_SERVICES=1 forbids skipping)')
    pytest.skip(message)


def _port_open(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or '127.0.0.1', parsed.port or default_port),
                                      timeout=1):
            return True
    except OSError:
        return False


def redis_reachable(url: str = REDIS_URL) -> bool:
    if not _port_open(url, 6379):
        return False
    import redis
    try:
        return redis.Redis.from_url(url, socket_timeout=2).ping()
    except redis.RedisError:
        return False


def postgres_reachable() -> bool:
    if not _port_open(DATABASE_URL, 5432):
        return False
    import psycopg2
    try:
        psycopg2.connect(DATABASE_URL, connect_timeout=2).close()
        return True
    except psycopg2.Error:
        return False


def _admin(statement: str) -> None:
    import psycopg2
    conn = psycopg2.connect(DATABASE_URL)
    conn.autocommit = True
    try:
        conn.cursor().execute(statement)
    finally:
        conn.close()


def create_test_database(suffix: str = '', schema: str = SCHEMA_SQL) -> str:
    """A new database named for this process, with the web app's schema applied."""
    name = 'whitenote_test_%d%s' % (os.getpid(), suffix)
    _admin('DROP DATABASE IF EXISTS %s' % name)
    _admin('CREATE DATABASE %s' % name)
    url = urlparse(DATABASE_URL)._replace(path='/' + name).geturl()
    import psycopg2
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cursor:
        cursor.execute(open(schema).read())
    conn.close()
    return url


def drop_test_database(url: str) -> None:
    _admin('DROP DATABASE IF EXISTS %s WITH (FORCE)' % urlparse(url).path[1:])


def create_webapp_tables(database, schema: str = SCHEMA_SQL) -> None:
    """The web app's tables, from its SQL, as it would have made them."""
    database.connection().executescript(open(schema).read())


def truncate_all(database) -> None:
    """Empty the web app's tables and the worker's own (in their schema)."""
    from models import WORKER_SCHEMA
    tables = ['"%s"' % t for t in database.get_tables()]
    tables += ['"%s"."%s"' % (WORKER_SCHEMA, t) for t in database.get_tables(schema=WORKER_SCHEMA)]
    if tables:
        database.execute_sql('TRUNCATE %s CASCADE' % ', '.join(tables))


@dataclasses.dataclass
class Database:
    kind: str
    url: str
    handle: object


# Data.

def make_user(email: str = None, config: dict | None = None):
    """A user, with an AiConfig row when ``config`` is given (None: no row at all)."""
    from models import AiConfig
    from models import User
    user = User.create(email=email or 'user-%s@example.org' % time.monotonic_ns())
    if config is not None:
        AiConfig.create(user=user, **config)
    return user


def model_config(fake, **extra) -> dict:
    """AiConfig fields that point a user at a fake model server."""
    return dict(openai_base_url=fake.url, openai_api_key=fake.api_key, **extra)


def ragflow_config(fake, api_key: str | None = None, **extra) -> dict:
    """AiConfig fields that give a user a new dataset of their own on a fake RAGFlow."""
    api_key = api_key or 'ragflow-key-%d' % time.monotonic_ns()
    return dict(ragflow_base_url=fake.url, ragflow_api_key=api_key,
                ragflow_dataset_id=fake.add_dataset(api_key), **extra)


def make_workspace(user, name: str = 'Notes', is_default: bool = False, dataset_id: str | None = None,
                   auto_tag: bool = True, briefing: bool = True):
    """A workspace of ``user`` (workspaces shape)."""
    from models import Workspace
    return Workspace.create(user=user, name=name, is_default=is_default, ragflow_dataset_id=dataset_id,
                            enable_auto_tag=auto_tag, enable_briefing=briefing)


def add_ai_config(user, **columns) -> None:
    """An AiConfig row of the workspaces shape, with these columns ("openaiApiKey": ...)
    and the web app's defaults for the others."""
    import models
    columns = {'id': models.new_id(), 'userId': user.id, 'updatedAt': models.utcnow(), **columns}
    models.database.execute_sql(models.sql('INSERT INTO "AiConfig" (%s) VALUES (%s)' % (
        ', '.join('"%s"' % name for name in columns), models.placeholders(len(columns)))),
        list(columns.values()))


def make_ws_message(user, content: str, workspace=None, created_at: datetime.datetime | None = None):
    """A message in ``workspace`` (None: in none) by ``user`` (None: a system message),
    as the web app of the workspaces shape writes it; its id."""
    import models
    created_at = created_at or models.utcnow()
    message_id = models.new_id()
    models.database.execute_sql(models.sql(
        'INSERT INTO "Message" ("id", "content", "createdAt", "updatedAt", "authorId", "workspaceId") '
        'VALUES (?, ?, ?, ?, ?, ?)'), (message_id, content, created_at, created_at,
                                       user.id if user else None, workspace.id if workspace else None))
    return ws_message(message_id)


def ws_message(message_id: str):
    """A message of the workspaces shape: the columns the models map there."""
    from models import Message
    return (Message
            .select(*[field for field in Message._meta.sorted_fields if field.name != 'parent'])
            .where(Message.id == message_id)
            .first())


def move_message(message, workspace) -> None:
    import models
    models.database.execute_sql(models.sql('UPDATE "Message" SET "workspaceId" = ? WHERE "id" = ?'),
                                (workspace.id if workspace else None, message.id))


def make_message(user, content: str, created_at: datetime.datetime | None = None, **fields):
    from models import Message
    from models import utcnow
    created_at = created_at or utcnow()
    return Message.create(author=user, content=content, created_at=created_at,
                          updated_at=created_at, **fields)


def make_versions(message, times: list, ids: list | None = None) -> list[tuple]:
    """Version rows of a message, inserted in the order given; their (createdAt, id)."""
    from models import MessageVersion
    from models import new_id
    ids = ids or [new_id() for _ in times]
    rows = [dict(id=version_id, message=message, content='version %d' % n, created_at=when)
            for n, (when, version_id) in enumerate(zip(times, ids, strict=True))]
    for start in range(0, len(rows), 500):
        MessageVersion.insert_many(rows[start:start + 500]).execute()
    return list(zip(times, ids, strict=True))


def tag_names(message_id: str) -> list[str]:
    from models import MessageTag
    from models import Tag
    query = (Tag
             .select(Tag.name)
             .join(MessageTag)
             .where(MessageTag.message == message_id)
             .order_by(Tag.name))
    return [tag.name for tag in query]


def job_state(kind: str, message_id: str):
    from models import JobState
    return JobState.get_or_none((JobState.kind == kind) & (JobState.message_id == message_id))


def drain(huey, max_tasks: int = 200) -> int:
    """Run every queued and scheduled task in this process, retries included, at once."""
    far_future = datetime.datetime.utcnow() + datetime.timedelta(days=1)
    count = 0
    while count < max_tasks:
        task = huey.dequeue() if huey.pending_count() else None
        if task is not None:
            huey.execute(task, far_future)
            count += 1
            continue
        scheduled = huey.read_schedule(far_future)
        if not scheduled:
            return count
        for task in scheduled:
            huey.execute(task, far_future)
            count += 1
    raise AssertionError('queue did not drain in %d tasks' % max_tasks)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = 'condition'):
    """Poll until ``predicate()`` is true; a deadline for progress, not a timing claim."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError('timed out after %.0fs waiting for %s' % (timeout, what))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def subprocess_env(env: dict) -> dict:
    """This process's environment for a worker subprocess; REDIS_URL only if ``env`` has it,
    and none of the variables ``env`` sets to None."""
    full = {k: v for k, v in os.environ.items() if k != 'REDIS_URL'}
    full['PYTHONPATH'] = ROOT
    full.update(env)
    return {k: v for k, v in full.items() if v is not None}


def enqueue_in_subprocess(env: dict, cwd: str, pairs: list) -> list:
    """``enqueue_message_jobs(user_id, message_id)`` for each pair, in a process with
    ``env`` (as a web app would call it): per call, what it returned and its seconds."""
    code = ('import json, sys, time, whitenote_huey\n'
            'calls = []\n'
            'for user_id, message_id in json.load(sys.stdin):\n'
            '    started = time.monotonic()\n'
            '    enqueued = whitenote_huey.enqueue_message_jobs(user_id, message_id)\n'
            '    calls.append((enqueued, time.monotonic() - started))\n'
            'print(json.dumps(calls))\n')
    result = subprocess.run([sys.executable, '-c', code], input=json.dumps(pairs), cwd=cwd,
                            env=subprocess_env(env), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def worker_env(db, redis: bool) -> dict:
    """Settings for a worker subprocess on the test database ``db``, with Redis or not."""
    env = {'DATABASE_URL': db.url, 'WHITENOTE_SECRET': os.environ['WHITENOTE_SECRET'], 'LOG_LEVEL': 'INFO'}
    if redis:
        env['REDIS_URL'] = os.environ['REDIS_URL']
    return env


def cli(env: dict, cwd: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m whitenote_huey ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, '-m', 'whitenote_huey', *args], cwd=cwd,
                          env=subprocess_env(env),
                          capture_output=True, text=True, timeout=60)


class Consumer:
    """The real ``huey_consumer whitenote_huey.huey`` as a subprocess."""

    def __init__(self, env: dict, cwd: str, *options: str, log_path: str | None = None):
        self.env = env
        self.cwd = cwd
        self.options = options or ('-w', '2', '-k', 'thread')
        self.log_path = log_path or os.path.join(cwd, 'consumer.log')
        self.process = None

    def start(self) -> 'Consumer':
        env = subprocess_env(self.env)
        self._log = open(self.log_path, 'ab')
        consumer = os.path.join(os.path.dirname(sys.executable), 'huey_consumer')
        self.process = subprocess.Popen([consumer, 'whitenote_huey.huey', *self.options],
                                        cwd=self.cwd, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        with open(self.log_path, errors='replace') as handle:
            return handle.read()

    def stop(self, sig=None, timeout: float = 30) -> int:
        import signal
        if self.process.poll() is None:
            self.process.send_signal(sig or signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


class RedisServer:
    """A redis-server of a test's own on a free port (password, TLS, persistence as asked).

    ``options`` are redis-server arguments, e.g. ('--requirepass', 'secret').  With
    ``tls`` (a dict of cert, key and ca file paths) it listens with TLS only.
    """

    def __init__(self, directory: str, *options: str, tls: dict | None = None):
        self.directory = directory
        self.options = options
        self.tls = tls
        self.port = free_port()
        self.process = None

    def start(self) -> 'RedisServer':
        args = ['redis-server', '--bind', '127.0.0.1', '--dir', self.directory, '--save', '',
                '--appendonly', 'no', '--logfile', os.path.join(self.directory, 'redis.log')]
        if self.tls:
            args += ['--port', '0', '--tls-port', str(self.port),
                     '--tls-cert-file', self.tls['cert'], '--tls-key-file', self.tls['key'],
                     '--tls-ca-cert-file', self.tls['ca'], '--tls-auth-clients', 'no']
        else:
            args += ['--port', str(self.port)]
        self.process = subprocess.Popen([*args, *self.options], cwd=self.directory,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.process.poll() is not None or _port_open(
            'redis://127.0.0.1:%d' % self.port, self.port), timeout=20, what='redis-server to listen')
        if self.process.poll() is not None:
            raise RuntimeError('redis-server exited with %s; see %s/redis.log'
                               % (self.process.returncode, self.directory))
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: gone at once, and without persistence its data with it; ``start()``
        brings it back, empty, on the same port."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def url(self) -> str:
        return 'redis://127.0.0.1:%d/0' % self.port

    def client(self):
        import redis
        return redis.Redis.from_url(self.url)

    def __enter__(self) -> 'RedisServer':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class CaptureServer:
    """A TCP server on 127.0.0.1 that records every connection made to it (with the first
    bytes sent) and answers each with HTTP 200 ``{}``: where traffic that must never be
    sent would land, so that "nothing was sent" is a count of connections."""

    def __init__(self):
        self.connections: list[tuple[tuple, bytes]] = []
        self._lock = threading.Lock()

    def __enter__(self) -> 'CaptureServer':
        capture = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.settimeout(2)
                try:
                    data = self.request.recv(4096)
                except OSError:
                    data = b''
                with capture._lock:
                    capture.connections.append((self.client_address, data))
                try:
                    self.request.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n'
                                         b'Content-Length: 2\r\nConnection: close\r\n\r\n{}')
                except OSError:
                    pass

        self.server = socketserver.ThreadingTCPServer(('127.0.0.1', 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return 'http://127.0.0.1:%d' % self.port


# The web app's side, played by its own Node packages.

NODE_CACHE = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'),
                          'whitenote-huey-tests')
WEBAPP_QUEUE_JS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'webapp_queue.cjs')


def node_available() -> bool:
    return bool(shutil.which('node') and shutil.which('npm'))


def npm_packages(name: str, *packages: str) -> str:
    """A folder of the cache whose node_modules holds ``packages`` (npm specs), installed
    once: into a temporary folder, then renamed into place, so that concurrent runs never
    see half an install.  Skips (fails under WHITENOTE_REQUIRE_SERVICES=1) without node."""
    require('node', node_available())
    target = os.path.join(NODE_CACHE, name)
    if os.path.isdir(os.path.join(target, 'node_modules')):
        return target
    os.makedirs(NODE_CACHE, exist_ok=True)
    building = tempfile.mkdtemp(prefix=name + '.', dir=NODE_CACHE)
    try:
        with open(os.path.join(building, 'package.json'), 'w') as handle:
            json.dump({'name': 'whitenote-huey-tests-' + name, 'private': True}, handle)
        subprocess.run(['npm', 'install', '--no-audit', '--no-fund', '--loglevel=error', *packages],
                       cwd=building, check=True, capture_output=True, timeout=600)
        try:
            os.rename(building, target)
        except OSError:  # another run put it in place first
            if not os.path.isdir(os.path.join(target, 'node_modules')):
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


class WebAppQueue:
    """The web app's BullMQ queue, driven through its own Node client (npm bullmq@5)."""

    def __init__(self, redis_url: str, name: str):
        self.redis_url = redis_url
        self.name = name
        self.modules = os.path.join(npm_packages('bullmq5', 'bullmq@5'), 'node_modules')

    def _run(self, command: str, payload=None):
        result = subprocess.run(['node', WEBAPP_QUEUE_JS, self.redis_url, self.name, command],
                                input=json.dumps(payload), capture_output=True, text=True,
                                timeout=300, env=dict(os.environ, NODE_PATH=self.modules))
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def add(self, *jobs: tuple[str, object]) -> list[str]:
        """addTask(type, data) for each (type, data), one after the other; the job ids."""
        return self._run('add', [{'type': kind, 'data': data} for kind, data in jobs])

    def add_paced(self, jobs: list[tuple[str, object]], pause: tuple[float, float]) -> list[tuple[str, float]]:
        """add() one job at a time after a random pause of ``pause`` seconds: (id, when added, s)."""
        added = self._run('paced', {'jobs': [{'type': kind, 'data': data} for kind, data in jobs],
                                    'pause': [1000 * pause[0], 1000 * pause[1]]})
        return [(job_id, at / 1000) for job_id, at in added]

    def add_cron(self, kind: str, pattern: str) -> str:
        return self._run('cron', {'type': kind, 'pattern': pattern})

    def counts(self) -> dict:
        return self._run('counts')

    def failed(self) -> list[dict]:
        return self._run('failed')

    def workers(self) -> int:
        return self._run('workers')

    def settled(self) -> bool:
        """Nothing waiting or running."""
        counts = self.counts()
        return not (counts['wait'] or counts['active'] or counts['prioritized'])


PRISMA_PACKAGES = ('prisma@7', '@prisma/client@7', '@prisma/adapter-better-sqlite3@7', 'better-sqlite3@12')
WEBAPP_PRISMA_JS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'webapp_prisma.cjs')


def prisma_client() -> tuple[str, str]:
    """Prisma Client 7 generated from today's WhiteNote's data model (TODAY_PRISMA), in
    the cache: (the client's folder, the node_modules that hold the adapter).  Generated
    once per data model, into a temporary folder renamed into place.  ``prisma generate``
    needs no engine for this client but would download one: PRISMA_SCHEMA_ENGINE_BINARY
    and PRISMA_QUERY_ENGINE_LIBRARY name a stand-in, and the missing checksums are
    ignored."""
    modules = os.path.join(npm_packages('prisma7', *PRISMA_PACKAGES), 'node_modules')
    model = open(TODAY_PRISMA).read()
    target = os.path.join(NODE_CACHE, 'prisma7-client-%s' % hashlib.sha256(model.encode()).hexdigest()[:12])
    ready = os.path.join(target, 'generated')  # written last: the client is whole
    if os.path.isfile(ready):
        return os.path.join(target, 'client'), modules
    building = tempfile.mkdtemp(prefix='prisma7-client.', dir=NODE_CACHE)
    try:
        os.symlink(modules, os.path.join(building, 'node_modules'))
        stand_in = os.path.join(building, 'no-engine')
        with open(stand_in, 'w') as handle:
            handle.write('#!/bin/sh\necho "no engine here" >&2\nexit 1\n')
        os.chmod(stand_in, 0o755)
        with open(os.path.join(building, 'schema.prisma'), 'w') as handle:
            handle.write('generator client {\n  provider = "prisma-client-js"\n  output   = "%s"\n}\n\n%s'
                         % (os.path.join(target, 'client'), model))
        env = dict(os.environ, PRISMA_SCHEMA_ENGINE_BINARY=stand_in, PRISMA_QUERY_ENGINE_LIBRARY=stand_in,
                   PRISMA_ENGINES_CHECKSUM_IGNORE_MISSING='1', CHECKPOINT_DISABLE='1',
                   PRISMA_HIDE_UPDATE_MESSAGE='1')
        # Generated where it stays (the client names its own folder), under a lock that
        # makes concurrent runs wait for the first; "generated" marks it whole.
        import fcntl
        with open(os.path.join(NODE_CACHE, 'prisma7-client.lock'), 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.isfile(ready):
                shutil.rmtree(target, ignore_errors=True)
                result = subprocess.run(['node', os.path.join(modules, 'prisma', 'build', 'index.js'), 'generate',
                                         '--schema', os.path.join(building, 'schema.prisma')],
                                        cwd=building, env=env, capture_output=True, text=True, timeout=300)
                assert result.returncode == 0, result.stdout + result.stderr
                open(ready, 'w').close()
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return os.path.join(target, 'client'), modules


class WebAppPrisma:
    """Today's WhiteNote's data layer, as the web app runs it: Prisma Client 7 with
    @prisma/adapter-better-sqlite3, on the SQLite file ``path``, driven by webapp_prisma.cjs."""

    def __init__(self, path: str):
        self.path = path
        self.client, self.modules = prisma_client()

    def start(self, command: str, payload=None) -> subprocess.Popen:
        """The command in the background; finish() reads what it printed."""
        process = subprocess.Popen(['node', WEBAPP_PRISMA_JS, self.client, 'file:' + self.path, command],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=dict(os.environ, NODE_PATH=self.modules))
        process.stdin.write(json.dumps(payload))
        process.stdin.close()
        return process

    @staticmethod
    def finish(process: subprocess.Popen, timeout: float = 300):
        out, err = process.stdout.read(), process.stderr.read()
        process.wait(timeout)
        assert process.returncode == 0, err
        return json.loads(out)

    def run(self, command: str, payload=None):
        return self.finish(self.start(command, payload))
