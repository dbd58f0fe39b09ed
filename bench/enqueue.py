"""Enqueue rate from one process: the worker's task calls against raw LPUSH, Celery and RQ.

    python bench/enqueue.py [--count 1000] [--rounds 15]

Starts its own redis-server and PostgreSQL database.  Each round runs every case once,
in turn, ``count`` calls each, so a burst of load from elsewhere on the machine hits
all cases alike; the figure per case is its median rate over the rounds (the best
round is shown too), and every ratio is against raw redis-py LPUSH of a payload as big
as the worker's own.
"""
import argparse
import os
import time

import common


def noop(user_id, message_id):
    """The peers' task: only its enqueue is measured."""


def rate(call, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        call()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--count', type=int, default=1000)
    parser.add_argument('--rounds', type=int, default=15)
    args = parser.parse_args()
    print(common.machine())
    with common.redis_server() as redis_url, common.postgres_database() as database_url:
        common.worker_environment(database_url, redis_url)
        import celery
        import redis
        import rq
        import services

        import whitenote_huey

        with whitenote_huey.database.connection_context():
            user = services.make_user(config={'enable_auto_tag': True})
            message = services.make_message(user, 'A note to enqueue jobs for')
        user_id, message_id = user.id, message.id
        huey = whitenote_huey.huey
        # The priority queue stores an 8-byte timestamp before the signed pickle.
        payload = b'x' * (len(huey.serialize_task(whitenote_huey.auto_tag.s(user_id, message_id))) + 8)
        client = redis.Redis.from_url(redis_url)
        app = celery.Celery('bench', broker=redis_url)
        app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)
        celery_noop = app.task(noop, name='bench.noop')
        rq_queue = rq.Queue('bench', connection=redis.Redis.from_url(redis_url))

        cases = {
            'raw redis-py LPUSH': lambda: client.lpush('bench:raw', payload),
            'auto_tag() task call': lambda: whitenote_huey.auto_tag(user_id, message_id),
            'enqueue_message_jobs()': lambda: whitenote_huey.enqueue_message_jobs(user_id, message_id),
            'Celery .delay()': lambda: celery_noop.delay(user_id, message_id),
            'RQ Queue.enqueue()': lambda: rq_queue.enqueue('enqueue.noop', user_id, message_id),
        }
        for call in cases.values():  # connections, scripts and imports made before timing
            rate(call, 20)
        rates = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, call in cases.items():
                client.flushdb()
                rates[name].append(rate(call, args.count))
        client.flushdb()
        assert whitenote_huey.enqueue_message_jobs(user_id, message_id) == ['auto-tag']
        assert len(huey) == 1, 'enqueue_message_jobs enqueued nothing'

    print('payload: %d bytes (signed pickle of auto_tag(user_id, message_id) + 8-byte priority prefix)'
          % len(payload))
    print('%d calls per case per round, %d rounds, median rate; pid %d' % (args.count, args.rounds, os.getpid()))
    baseline = common.median(rates['raw redis-py LPUSH'])
    celery_rate = common.median(rates['Celery .delay()'])
    print('%-24s %10s %9s %10s %10s' % ('case', 'per second', 'vs LPUSH', 'vs Celery', 'best round'))
    for name, values in rates.items():
        value = common.median(values)
        print('%-24s %10.0f %8.0f%% %9.2fx %10.0f' % (name, value, 100 * value / baseline,
                                                      value / celery_rate, max(values)))
    direct = common.median(rates['auto_tag() task call']) / baseline
    jobs = common.median(rates['enqueue_message_jobs()']) / celery_rate
    print('goal: auto_tag() >= 60%% of LPUSH: %.0f%% -> %s' % (100 * direct, 'met' if direct >= 0.6 else 'MISSED'))
    print('goal: enqueue_message_jobs() ahead of Celery: %.2fx -> %s' % (jobs, 'met' if jobs > 1 else 'MISSED'))


if __name__ == '__main__':
    main()
