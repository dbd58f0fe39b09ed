"""Enqueue-to-start latency of one job on an idle consumer, on Redis and on embedded SQLite.

    python bench/latency.py [--samples 200] [--sqlite-samples 120]

Runs the consumer with run_consumer.sh's options on the worker's own Huey plus a task
that records when it started (bench/latency_app.py): once on a redis-server of its
own, once on the embedded SQLite queue.  Jobs are enqueued one at a time, with a pause
between them long enough for the idle consumer's polling to back off fully (the SQLite
queue is polled; Redis blocks on BZPOPMIN).  Prints the median and 99th percentile.
"""
import argparse
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time

import common


def measure(workdir: str, samples: int, pause: tuple[float, float]) -> list[float]:
    """Run in a process whose environment chose the storage before whitenote_huey's import."""
    import latency_app
    huey = latency_app.huey
    env = {k: os.environ[k] for k in ('DATABASE_URL', 'WHITENOTE_SECRET', 'REDIS_URL') if k in os.environ}
    with common.Consumer(workdir, env, app='latency_app.huey'):
        latency_app.stamp('warm-up', time.time())
        common.wait_until(lambda: huey.get('warm-up') is not None, 60, 0.01, what='the consumer to start')
        for i in range(samples):
            time.sleep(random.uniform(*pause))
            latency_app.stamp('latency-%d' % i, time.time())
        common.wait_until(lambda: huey.get('latency-%d' % (samples - 1), peek=True) is not None,
                          60, 0.01, what='the last job')
        return [huey.get('latency-%d' % i) for i in range(samples)]


def run(storage: str, samples: int, pause: str) -> list[float]:
    """Measure ``storage`` in a child process: the storage is fixed when whitenote_huey loads."""
    redis = common.redis_server() if storage == 'redis' else contextlib.nullcontext()
    with redis as redis_url, tempfile.TemporaryDirectory(prefix='whitenote-bench-') as workdir:
        env = {'DATABASE_URL': 'sqlite:///%s/whitenote.db' % workdir, 'WHITENOTE_SECRET': common.SECRET}
        if redis_url:
            env['REDIS_URL'] = redis_url
        child = subprocess.run([sys.executable, __file__, '--child', workdir, str(samples), pause],
                               env=common.services.subprocess_env(env), check=True,
                               stdout=subprocess.PIPE, text=True)
    return [float(value) for value in child.stdout.split()]


def report(name: str, values: list[float]) -> float:
    median = common.median(values)
    print('%-22s median %7.2f ms   p99 %7.2f ms   max %7.2f ms   (%d jobs)'
          % (name, 1000 * median, 1000 * common.percentile(values, 0.99), 1000 * max(values), len(values)))
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--samples', type=int, default=200, help='jobs on Redis')
    parser.add_argument('--sqlite-samples', type=int, default=120, help='jobs on the SQLite queue')
    parser.add_argument('--child', nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        workdir, samples, pause = args.child
        low, high = (float(value) for value in pause.split(','))
        print(' '.join('%.6f' % value for value in measure(workdir, int(samples), (low, high))))
        return
    print(common.machine())
    print('run_consumer.sh options: %s' % ' '.join(common.run_consumer_options()))
    redis = run('redis', args.samples, '0.05,0.3')
    embedded = run('sqlite', args.sqlite_samples, '1.5,2.5')
    report('Redis queue', redis)
    median = report('embedded SQLite queue', embedded)
    print('goal: embedded median under 100 ms: %.1f ms -> %s'
          % (1000 * median, 'met' if median < 0.1 else 'MISSED'))


if __name__ == '__main__':
    main()
