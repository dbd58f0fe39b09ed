"""Redis and PostgreSQL credentials: passwords, ACL users and TLS, all through the URLs.

Each Redis here is a redis-server of the test's own; TLS certificates are made for the
test with the openssl command.  PostgreSQL with TLS and password checks is a throwaway
cluster of the test's own (initdb, a few seconds), since the shared test server trusts
every local connection and may have TLS off.  The tests take seconds each because they
run the real program: the consumer and the command line as subprocesses.
"""
import os
import shutil
import signal
import subprocess
import tempfile
from urllib.parse import quote

import peewee
import psycopg2
import pytest
import redis
import services
from services import Consumer
from services import RedisServer
from services import cli
from services import create_test_database
from services import drop_test_database
from services import free_port
from services import make_message
from services import make_user
from services import tag_names
from services import wait_for

import models
import whitenote_huey
from whitenote_huey import connect_database
from whitenote_huey import load_settings

PASSWORD = 'p@ss w:rd/%?#&£'  # every character a URL would misread
# The queue's credentials do not depend on the database: one kind is enough.
SQLITE_ONLY = pytest.mark.parametrize('db', ['sqlite'], indirect=True)
PG_BIN = '/usr/lib/postgresql/15/bin'


def redis_url(port: int, password: str | None = None, user: str = '', scheme: str = 'redis',
              query: str = '') -> str:
    auth = '%s:%s@' % (quote(user, safe=''), quote(password, safe='')) if password is not None else ''
    return '%s://%s127.0.0.1:%d/0%s' % (scheme, auth, port, query)


def worker_env(db_url: str, redis_url: str | None = None) -> dict:
    env = {'DATABASE_URL': db_url, 'WHITENOTE_SECRET': os.environ['WHITENOTE_SECRET']}
    if redis_url:
        env['REDIS_URL'] = redis_url
    return env


def run_one_job(db_url: str, url: str, cwd: str) -> str:
    """Enqueue auto-tag with the command line and let a consumer run it; the consumer's log."""
    user = make_user(config=None)  # offline tags: no model needed
    note = make_message(user, 'through the queue #queued')
    env = worker_env(db_url, url)
    consumer = Consumer(env, cwd).start()
    try:
        result = cli(env, cwd, 'enqueue', 'auto-tag', note.id)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: tag_names(note.id) == ['queued'], what='the job on the consumer')
    finally:
        assert consumer.stop() == 0
    return consumer.log()


def enqueue_fails(db_url: str, url: str, cwd: str) -> str:
    """The command line's error when the queue at ``url`` refuses it."""
    note = make_message(make_user(config=None), 'never queued')
    result = cli(worker_env(db_url, url), cwd, 'enqueue', 'auto-tag', note.id)
    assert result.returncode == whitenote_huey.EXIT_UNAVAILABLE, result.stderr
    assert 'Traceback' not in result.stderr
    return result.stderr.strip()


def make_certs(directory) -> dict:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    os.makedirs(directory, exist_ok=True)
    path = lambda name: os.path.join(directory, name)  # noqa: E731
    ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes']
    with open(path('san.ext'), 'w') as handle:
        handle.write('subjectAltName=IP:127.0.0.1\n')
    for args in (
        ['req', '-x509', *ec, '-days', '1', '-subj', '/CN=whitenote test CA',
         '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=keyCertSign,cRLSign',
         '-keyout', path('ca.key'), '-out', path('ca.pem')],
        ['req', *ec, '-subj', '/CN=127.0.0.1', '-keyout', path('server.key'), '-out', path('server.csr')],
        ['x509', '-req', '-in', path('server.csr'), '-CA', path('ca.pem'), '-CAkey', path('ca.key'),
         '-CAcreateserial', '-days', '1', '-extfile', path('san.ext'), '-out', path('server.pem')],
    ):
        subprocess.run(['openssl', *args], check=True, capture_output=True)
    return {'ca': path('ca.pem'), 'cert': path('server.pem'), 'key': path('server.key')}


# Redis.

def test_settings_take_redis_urls_with_passwords_and_tls():
    for url in (redis_url(6379, PASSWORD), redis_url(6379, PASSWORD, user='whitenote'),
                redis_url(6380, PASSWORD, scheme='rediss', query='?ssl_ca_certs=/etc/ca.pem')):
        assert load_settings({'REDIS_URL': url}).redis_url == url
    pool = redis.ConnectionPool.from_url(redis_url(6379, PASSWORD, user='whitenote'))
    assert (pool.connection_kwargs['username'], pool.connection_kwargs['password']) == (
        'whitenote', PASSWORD)


@SQLITE_ONLY
def test_redis_with_a_password(db, tmp_path):
    with RedisServer(str(tmp_path), '--requirepass', PASSWORD) as server:
        run_one_job(db.url, redis_url(server.port, PASSWORD), str(tmp_path))
        wrong = enqueue_fails(db.url, redis_url(server.port, 'wrong-pass-7f3a'), str(tmp_path))
        assert wrong == (
            'whitenote-huey: the database or the queue failed: the queue at REDIS_URL '
            'redis://:***@127.0.0.1:%d/0 cannot be used: AuthenticationError: invalid '
            'username-password pair or user is disabled.' % server.port)
        # A consumer with the wrong password says so plainly, without the password.
        env = worker_env(db.url, redis_url(server.port, 'wrong-pass-7f3a'))
        consumer = Consumer(env, str(tmp_path), '-w', '1', log_path=str(tmp_path / 'wrong.log')).start()
        try:
            wait_for(lambda: 'cannot be used' in consumer.log(), what='the consumer to complain')
        finally:
            consumer.stop()
        assert ('the queue at REDIS_URL redis://:***@127.0.0.1:%d/0 cannot be used: '
                'AuthenticationError' % server.port) in consumer.log()
        assert 'wrong-pass' not in consumer.log()


@SQLITE_ONLY
def test_redis_acl_user_limited_to_the_queue_keys(db, tmp_path):
    with RedisServer(str(tmp_path)) as server:
        admin = redis.Redis(port=server.port)
        # What the README suggests: the worker's keys only, no dangerous commands.
        queue = os.environ['BULLMQ_QUEUE']
        admin.execute_command('ACL', 'SETUSER', 'whitenote', 'on', '>' + PASSWORD, '~huey.*',
                              '~bull:%s:*' % queue, '~worker:status', 'resetchannels', '+@all',
                              '-@dangerous', '+info')
        url = redis_url(server.port, PASSWORD, user='whitenote')
        log = run_one_job(db.url, url, str(tmp_path))
        assert 'NOPERM' not in log and 'no permissions' not in log, log[-2000:]
        # The web app's jobs, taken by a consumer under that user.
        user = make_user(config=None)
        note = make_message(user, 'from the web app #acl')
        services.WebAppQueue(server.url, queue).add(('auto-tag', {'userId': user.id, 'messageId': note.id}))
        consumer = Consumer(worker_env(db.url, url), str(tmp_path), '-w', '1',
                            log_path=str(tmp_path / 'acl.log')).start()
        try:
            wait_for(lambda: tag_names(note.id) == ['acl'], what="the web app's job under the ACL user")
            assert admin.get('worker:status')
        finally:
            assert consumer.stop() == 0
        assert 'NOPERM' not in consumer.log() and 'no permissions' not in consumer.log()
        limited = redis.Redis.from_url(url)
        admin.set('webapp:session', 'not the worker\'s')
        for command in (('GET', 'webapp:session'), ('FLUSHALL',), ('KEYS', '*'), ('CONFIG', 'GET', '*')):
            with pytest.raises(redis.exceptions.NoPermissionError):
                limited.execute_command(*command)


@SQLITE_ONLY
def test_redis_over_tls(db, tmp_path):
    certs = make_certs(tmp_path / 'certs')
    with RedisServer(str(tmp_path), '--requirepass', PASSWORD, tls=certs) as server:
        url = redis_url(server.port, PASSWORD, scheme='rediss',
                        query='?ssl_ca_certs=%s' % quote(certs['ca']))
        run_one_job(db.url, url, str(tmp_path))
        conn = redis.Redis.from_url(url)
        assert conn.ping() and conn.connection_pool.connection_class is redis.SSLConnection
        # Without the CA the server's certificate is refused; plain redis:// gets no answer.
        unknown_ca = enqueue_fails(db.url, redis_url(server.port, PASSWORD, scheme='rediss'),
                                   str(tmp_path))
        assert 'rediss://:***@127.0.0.1:%d/0 cannot be used' % server.port in unknown_ca
        assert 'certificate verify failed' in unknown_ca
        plain = enqueue_fails(db.url, redis_url(server.port, PASSWORD), str(tmp_path))
        assert 'cannot be used: ConnectionError' in plain
        for text in (unknown_ca, plain):
            assert PASSWORD not in text and quote(PASSWORD, safe='') not in text


# PostgreSQL.

def test_postgresql_url_password_is_percent_decoded():
    url = 'postgresql://whitenote:%s@db.example.org:6543/notes?sslmode=verify-full&sslrootcert=/ca.pem' \
        % quote(PASSWORD, safe='')
    assert load_settings({'DATABASE_URL': url}).database_url == url
    params = connect_database(url).connect_params
    assert params == {'user': 'whitenote', 'password': PASSWORD, 'host': 'db.example.org',
                      'port': 6543, 'sslmode': 'verify-full', 'sslrootcert': '/ca.pem'}


def test_postgresql_sslmode_reaches_the_server(postgres_url):
    """The shared server: with TLS on, the connection is TLS; with it off, require refuses."""
    conn = psycopg2.connect(postgres_url)
    with conn, conn.cursor() as cursor:
        cursor.execute('SHOW ssl')
        ssl_on = cursor.fetchone()[0] == 'on'
    conn.close()
    database = connect_database(postgres_url + '?sslmode=require')
    if ssl_on:
        database.connect()
        assert database.execute_sql('SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()') \
            .fetchone() == (True,)
        database.close()
    else:
        with pytest.raises(peewee.OperationalError, match='server does not support SSL'):
            database.connect()
    plain = connect_database(postgres_url + '?sslmode=disable')
    plain.connect()
    assert plain.execute_sql('SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()') \
        .fetchone() == (False,)
    plain.close()


class PostgresCluster:
    """A throwaway PostgreSQL cluster with TLS on, where TCP logins need TLS and a password."""

    def __init__(self, certs: dict):
        self.certs = certs
        self.port = free_port()
        self.process = None

    def _as_owner(self, *args: str) -> list[str]:
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            return ['setpriv', '--reuid=postgres', '--regid=postgres', '--init-groups', *args]
        return list(args)

    def __enter__(self) -> 'PostgresCluster':
        if not os.path.exists(os.path.join(PG_BIN, 'initdb')):
            pytest.skip('PostgreSQL server binaries not found in %s' % PG_BIN)
        self.directory = tempfile.mkdtemp(prefix='whitenote-pg-')  # outside root-only test dirs
        data = os.path.join(self.directory, 'data')
        for name in ('cert', 'key'):
            shutil.copy(self.certs[name], os.path.join(self.directory, 'server.' + name))
        os.chmod(os.path.join(self.directory, 'server.key'), 0o600)
        if os.geteuid() == 0:
            shutil.chown(self.directory, 'postgres', 'postgres')
            for name in os.listdir(self.directory):
                shutil.chown(os.path.join(self.directory, name), 'postgres', 'postgres')
        subprocess.run(self._as_owner(os.path.join(PG_BIN, 'initdb'), '-D', data, '-U', 'postgres',
                                      '-E', 'UTF8', '--auth-local=trust', '--no-instructions'),
                       check=True, capture_output=True)
        with open(os.path.join(data, 'pg_hba.conf'), 'w') as handle:
            handle.write('local all all trust\n'
                         'hostssl all all 127.0.0.1/32 scram-sha-256\n'
                         'host all all 127.0.0.1/32 reject\n')
        self.process = subprocess.Popen(self._as_owner(
            os.path.join(PG_BIN, 'postgres'), '-D', data, '-p', str(self.port), '-k', self.directory,
            '-c', 'listen_addresses=127.0.0.1', '-c', 'ssl=on', '-c', 'fsync=off',
            '-c', 'ssl_cert_file=%s/server.cert' % self.directory,
            '-c', 'ssl_key_file=%s/server.key' % self.directory),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._ready, timeout=30, what='the PostgreSQL cluster to accept connections')
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError('postgres exited with %s' % self.process.returncode)
        try:
            self.admin('SELECT 1')
            return True
        except psycopg2.OperationalError:
            return False

    def admin(self, statement: str, database: str = 'postgres') -> None:
        """Run a statement as the superuser, over the Unix socket (trusted)."""
        conn = psycopg2.connect(host=self.directory, port=self.port, user='postgres', dbname=database)
        conn.autocommit = True
        try:
            conn.cursor().execute(statement)
        finally:
            conn.close()

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: clients are cut off
            self.process.wait(30)
        shutil.rmtree(self.directory, ignore_errors=True)


def test_postgresql_with_tls_and_a_password(tmp_path):
    certs = make_certs(tmp_path / 'certs')
    with PostgresCluster(certs) as cluster:
        cluster.admin("CREATE ROLE whitenote LOGIN PASSWORD '%s'" % PASSWORD.replace("'", "''"))
        cluster.admin('CREATE DATABASE whitenote OWNER whitenote')
        base = 'postgresql://whitenote:%%s@127.0.0.1:%d/whitenote' % cluster.port
        url = base % quote(PASSWORD, safe='') + '?sslmode=verify-full&sslrootcert=%s' % certs['ca']
        result = cli(worker_env(url), str(tmp_path), 'init-db')
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith('created: User, Message, Tag')
        database = connect_database(url)
        database.connect()
        assert database.execute_sql('SELECT ssl, current_user FROM pg_stat_ssl WHERE pid = '
                                    'pg_backend_pid()').fetchone() == (True, 'whitenote')
        database.close()

        def refused(url: str) -> str:
            result = cli(worker_env(url), str(tmp_path), 'init-db')
            assert result.returncode == whitenote_huey.EXIT_UNAVAILABLE, result.stderr
            assert 'Traceback' not in result.stderr
            assert PASSWORD not in result.stderr and quote(PASSWORD, safe='') not in result.stderr
            assert 'cannot connect to DATABASE_URL postgresql://whitenote:***@127.0.0.1' in result.stderr
            return result.stderr

        wrong = refused(base % 'wrong-pass-7f3a' + '?sslmode=require')
        assert 'password authentication failed for user "whitenote"' in wrong
        assert 'wrong-pass' not in wrong
        plain = refused(base % quote(PASSWORD, safe='') + '?sslmode=disable')
        assert 'no encryption' in plain
        unverified = refused(base % quote(PASSWORD, safe='') + '?sslmode=verify-full&sslrootcert='
                             + os.path.join(os.path.dirname(certs['ca']), 'server.pem'))
        assert 'certificate verify failed' in unverified


def test_least_privilege_role_runs_the_worker(redis_queue, tmp_path):
    """A role that can write the web app's rows and make its own schema, and no more: it
    cannot create anything in the web app's schema."""
    services.require('postgresql', services.postgres_reachable())
    role = 'whitenote_worker_%d' % os.getpid()
    url = create_test_database('_role')
    services._admin('DROP ROLE IF EXISTS %s' % role)
    services._admin("CREATE ROLE %s LOGIN PASSWORD '%s'" % (role, PASSWORD.replace("'", "''")))
    owner = psycopg2.connect(url)
    owner.autocommit = True
    cursor = owner.cursor()
    cursor.execute('REVOKE CREATE ON SCHEMA public FROM PUBLIC')  # the default before PostgreSQL 15
    for grant in ('GRANT CONNECT, CREATE ON DATABASE %s TO %%s' % url.rsplit('/', 1)[1],
                  'GRANT USAGE ON SCHEMA public TO %s',
                  'GRANT SELECT, INSERT, UPDATE, DELETE ON "User", "AiConfig", "Message", "Tag", '
                  '"MessageTag", "MessageVersion" TO %s'):
        cursor.execute(grant % role)
    role_url = url.replace('postgres@', '%s:%s@' % (role, quote(PASSWORD, safe='')), 1)
    assert connect_database(role_url).connect_params['password'] == PASSWORD
    try:
        env = worker_env(role_url, os.environ['REDIS_URL'])
        result = cli(env, str(tmp_path), 'init-db')
        assert result.stdout.strip() == 'created: ' + ', '.join(
            model._meta.table_name for model in models.WORKER_MODELS), result.stderr
        whitenote_huey.use_database(role_url)
        user = make_user(config=None)
        note = make_message(user, 'least privilege #minimal')
        consumer = Consumer(env, str(tmp_path)).start()
        try:
            whitenote_huey.auto_tag(user.id, note.id)
            wait_for(lambda: tag_names(note.id) == ['minimal'], what='auto-tag as the role')
        finally:
            assert consumer.stop() == 0
        cursor.execute('SELECT schemaname, tableowner FROM pg_tables WHERE tablename = %s',
                       ('whitenote_huey_job',))
        assert cursor.fetchall() == [(models.WORKER_SCHEMA, role)]
        with pytest.raises(peewee.ProgrammingError, match='permission denied for schema public'):
            models.database.execute_sql('CREATE TABLE "public"."worker_extra" (id integer)')
        with pytest.raises(peewee.ProgrammingError, match='must be owner'):
            models.database.execute_sql('ALTER TABLE "Message" ADD COLUMN "extra" integer')
    finally:
        owner.close()
        whitenote_huey.use_database(os.environ['DATABASE_URL'])
        drop_test_database(url)
        services._admin('DROP ROLE IF EXISTS %s' % role)
