"""What the benchmarks share: a private redis-server, a throwaway PostgreSQL database,
consumer subprocesses and their peak memory.

Every benchmark starts its own redis-server on a free port and its own database, so it
never touches a shared Redis or another run's rows, and removes both when it ends.
The database helpers and test data come from tests/services.py, the fake model from
tests/fake_model.py.
"""
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
TESTS = os.path.join(ROOT, 'tests')
sys.path[:0] = [p for p in (ROOT, TESTS, BENCH) if p not in sys.path]

# The base URL whose server gets the benchmark's own database (created, then dropped).
BASE_DATABASE_URL = os.environ.get('BENCH_DATABASE_URL', 'postgresql://postgres@127.0.0.1:5432/test')
os.environ['TEST_DATABASE_URL'] = BASE_DATABASE_URL
SECRET = 'bench-secret-not-for-production'
BIN = os.path.dirname(sys.executable)

import services  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def redis_server():
    """A redis-server of our own on a free port, keeping nothing on disk; yields its URL."""
    import redis
    port = free_port()
    workdir = tempfile.mkdtemp(prefix='whitenote-bench-redis-')
    process = subprocess.Popen(['redis-server', '--port', str(port), '--bind', '127.0.0.1',
                                '--save', '', '--appendonly', 'no', '--dir', workdir],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = 'redis://127.0.0.1:%d/0' % port
    try:
        services.wait_for(lambda: services.redis_reachable(url), timeout=10, interval=0.05,
                          what='redis-server on port %d' % port)
        yield url
    finally:
        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(url).shutdown(nosave=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def postgres_database():
    """A new PostgreSQL database holding the web app's tables; dropped afterwards."""
    if not services.postgres_reachable():
        raise SystemExit('PostgreSQL not reachable at %s (set BENCH_DATABASE_URL)' % BASE_DATABASE_URL)
    url = services.create_test_database()
    try:
        yield url
    finally:
        services.drop_test_database(url)  # WITH (FORCE): ends this process's connections too


@contextlib.contextmanager
def worker_services():
    """What a worker benchmark runs against: a redis-server, a PostgreSQL database holding
    the worker's tables too, the fake model and a working directory, all its own, with
    whitenote_huey in this process set up on them.  Yields the fake model, the working
    directory and the settings a consumer needs."""
    from fake_model import FakeModel
    with redis_server() as redis_url, postgres_database() as database_url, \
            FakeModel(api_key='sk-bench-model-key') as fake, \
            tempfile.TemporaryDirectory(prefix='whitenote-bench-') as workdir:
        worker_environment(database_url, redis_url)
        import models
        import whitenote_huey  # noqa: F401 - binds the models to the database
        models.create_tables()
        # The sweep leaves the benchmark's messages (all younger than an hour) to the jobs
        # enqueued for them: a pass at start would otherwise add up to SWEEP_MAX_ENQUEUE
        # copies of jobs still in the queue (bench/sweep.py measures the sweep).
        yield fake, workdir, {'DATABASE_URL': database_url, 'REDIS_URL': redis_url,
                              'WHITENOTE_SECRET': SECRET, 'SWEEP_GRACE_SECONDS': '3600'}


def worker_environment(database_url: str, redis_url: str | None) -> None:
    """Settings for whitenote_huey in this process; call before importing it."""
    os.environ.update({'DATABASE_URL': database_url, 'WHITENOTE_SECRET': SECRET})
    for name in ('OPENAI_API_KEY', 'LOG_LEVEL', 'HTTP_TIMEOUT', 'WORKERS', 'WORKER_TYPE',
                 'POLL_DELAY', 'POLL_MAX_DELAY'):
        os.environ.pop(name, None)
    if redis_url:
        os.environ['REDIS_URL'] = redis_url
    else:
        os.environ.pop('REDIS_URL', None)


def run_consumer_options(**given: str) -> list[str]:
    """run_consumer.sh's own options (--workers 5 ...), so a bench app runs like the worker;
    ``given`` sets some as run_consumer.sh's variables would (WORKERS='50')."""
    with open(os.path.join(ROOT, 'run_consumer.sh')) as handle:
        text = handle.read()
    pairs = re.findall(r'(--[\w-]+) "\$\{(\w+):-([^}]*)\}"', text)
    options = [part for option, name, default in pairs for part in (option, given.get(name, default))]
    assert '--workers' in options and '--delay' in options, 'run_consumer.sh changed shape'
    return options


class Consumer:
    """A consumer subprocess: run_consumer.sh itself, or huey_consumer on a bench app."""

    def __init__(self, cwd: str, env: dict, app: str | None = None, options: list | None = None,
                 args: list | None = None):
        self.cwd, self.env, self.app = cwd, env, app
        self.options = options if options is not None else run_consumer_options()
        self.args = args or []  # more options for run_consumer.sh, after its own
        self.log_path = os.path.join(cwd, 'consumer-%s.log' % (app or 'worker'))
        self.process = None

    def start(self) -> 'Consumer':
        env = services.subprocess_env(self.env)
        env['PATH'] = BIN + os.pathsep + os.environ.get('PATH', '')
        env['PYTHONPATH'] = os.pathsep.join((ROOT, BENCH))
        if self.app is None:
            command = [os.path.join(ROOT, 'run_consumer.sh'), *self.args]
        elif 'greenlet' in self.options:  # as run_consumer.sh starts greenlets
            command = [os.path.join(BIN, 'python'), '-m', 'gevent.monkey', '--module',
                       'huey.bin.huey_consumer', self.app, *self.options]
        else:
            command = [os.path.join(BIN, 'huey_consumer'), self.app, *self.options]
        self._log = open(self.log_path, 'ab')
        self.process = subprocess.Popen(command, cwd=self.cwd, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        return self

    def pids(self) -> list[int]:
        """The consumer's process and, with process workers, its children."""
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                for task in os.listdir('/proc/%d/task' % pid):
                    with open('/proc/%d/task/%s/children' % (pid, task)) as handle:
                        todo += [int(child) for child in handle.read().split()]
        return found

    def peak_rss_mb(self) -> float:
        """The consumer's peak resident memory so far (VmHWM), in MB; with process workers,
        the sum over its processes (which counts the pages they share once each)."""
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError), open('/proc/%d/status' % pid) as handle:
                for line in handle:
                    if line.startswith('VmHWM:'):
                        total += int(line.split()[1]) / 1024
        return total

    def cpu_seconds(self) -> float:
        """User and system CPU time the consumer's processes have used so far."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError), open('/proc/%d/stat' % pid) as handle:
                fields = handle.read().rsplit(')', 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf('SC_CLK_TCK')

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def log(self) -> str:
        with open(self.log_path, errors='replace') as handle:
            return handle.read()

    def __enter__(self) -> 'Consumer':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def enqueue_at_once(huey, tasks: list) -> float:
    """Put the tasks on Huey's Redis queue in one round trip; returns when (epoch)."""
    pipe = huey.storage.conn.pipeline(transaction=False)
    for task in tasks:
        # As PriorityRedisStorage.enqueue writes it: a timestamp prefix, priority 0.
        pipe.zadd(huey.storage.queue_key,
                  {struct.pack('>Q', int(time.time() * 1e6)) + huey.serialize_task(task): 0})
    started = time.time()
    pipe.execute()
    return started


def huey_alone(workdir: str, env: dict, seconds: float, count: int, worker_type: str,
               workers: int, timeout: float = 600) -> float:
    """Huey alone, with run_consumer.sh's options, on ``count`` tasks that only wait
    ``seconds`` (bench/noop_app.py), enqueued at once: seconds until the last finished."""
    import noop_app
    huey = noop_app.huey

    def run(seconds: float, count: int) -> float:
        key = 'bench:wait:%d' % time.monotonic_ns()
        started = enqueue_at_once(huey, [noop_app.wait.s(seconds, key) for _ in range(count)])
        wait_until(lambda: int(huey.storage.conn.get(key) or 0) == count, timeout, 0.01,
                   what='the tasks that only wait')
        return float(huey.storage.conn.get(key + ':finished')) - started

    options = run_consumer_options(WORKERS=str(workers), WORKER_TYPE=worker_type)
    with Consumer(workdir, env, app='noop_app.huey', options=options):
        run(0.01, 2 * workers)  # warm-up
        return run(seconds, count)


def wait_until(predicate, timeout: float, interval: float = 0.001, what: str = 'condition') -> float:
    """Poll ``predicate`` until true; returns the monotonic time it was first seen true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(interval)
    raise SystemExit('benchmark stalled: timed out after %.0fs waiting for %s' % (timeout, what))


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(fraction * len(ordered) + 0.5)) - 1))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    """One line naming what these figures were measured on."""
    cpu = 'unknown CPU'
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as handle:
        for line in handle:
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    with open('/proc/meminfo') as handle:
        memory = int(handle.readline().split()[1]) / 1024 / 1024
    redis_version = subprocess.run(['redis-server', '--version'], capture_output=True,
                                   text=True).stdout.split()[2].removeprefix('v=')
    return '%d cores, %.0f GiB, %s; Python %s; redis-server %s' % (
        os.cpu_count(), memory, cpu, sys.version.split()[0], redis_version)
