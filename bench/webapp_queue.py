"""The web app's jobs: enqueue-to-start through BullMQ, CPU with encrypted keys, memory.

    python bench/webapp_queue.py [--samples 200] [--jobs 300]

One consumer (run_consumer.sh with its options, the BullMQ taker on) on a redis-server
and a PostgreSQL database of its own, the fake model answering at once:

1. Enqueue-to-start: auto-tag jobs enqueued one at a time by the web app's own client
   (npm bullmq@5, as its addTask does), each after a random pause, against the same jobs
   enqueued straight on Huey (the baseline), on the same consumer; the start is the
   job's "started" log line.  Goals: median at most 20 ms, 99th percentile at most 100 ms.
2. CPU per auto-tag for users whose key is stored encrypted by the web app, against users
   with a plain key, in alternating batches on the same consumer, after one job of each
   (the key derivation, once per process, is not a job's).  Goal: within 5%.
3. The consumer's peak memory over a drain of --drain auto-tags (as bench/drain.py's item
   7: 3,000 messages, the only ones, plain keys, text logs), in three fresh consumers: without the taker (BULLMQ_QUEUE
   empty, the jobs enqueued on Huey), with it (the jobs enqueued by the web app), and with
   it for users whose keys are encrypted.  Goal: under 80 MB with the taker.
"""
import argparse
import datetime
import json
import os
import random
import subprocess
import time

import common

SECRET = 'bench-encryption-key'


def started_at(consumer: common.Consumer) -> dict[str, float]:
    """When each message's auto-tag started, from the consumer's JSON log."""
    starts = {}
    for line in consumer.log().splitlines():
        if line.startswith('{'):
            entry = json.loads(line)
            if 'user_id' in entry and entry['message'].startswith('[auto-tag] ') and 'started' in entry['message']:
                when = datetime.datetime.fromisoformat(entry['time'].replace('Z', '+00:00')).timestamp()
                starts.setdefault(entry['message_id'], when)
    return starts


def encrypted(key: str) -> str:
    result = subprocess.run(['node', os.path.join(common.TESTS, 'webapp_crypto.cjs')],
                            input=json.dumps([{'secret': SECRET, 'plaintext': key}]),
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)[0]['ciphertext']


def messages(fake, count: int, key: str) -> list[tuple[str, str]]:
    import services
    user = services.make_user(config=dict(services.model_config(fake, enable_briefing=False), openai_api_key=key))
    return [(user.id, services.make_message(user, 'bench note %d about work' % n).id) for n in range(count)]


def fresh_messages(fake, count: int, key: str) -> list[tuple[str, str]]:
    """``count`` messages, the only ones: earlier messages and job records deleted."""
    from models import JOB_TABLE
    from models import database
    database.execute_sql('TRUNCATE "Message", "Tag", %s CASCADE' % JOB_TABLE)
    return messages(fake, count, key)


def done(pairs: list) -> bool:
    from models import JobState
    ids = [message_id for _, message_id in pairs]
    return JobState.select().where(JobState.message_id.in_(ids) & (JobState.status == 'done')).count() == len(ids)


def drain_peak(workdir: str, env: dict, pairs: list, queue=None) -> float:
    """A fresh consumer's peak memory (MB) over running these auto-tags, enqueued by the web
    app's client on ``queue``, else straight on Huey."""
    import whitenote_huey
    from models import JobState
    with common.Consumer(workdir, env) as consumer:
        expected = len(pairs)
        if queue is not None:
            ids = queue.add(*(('auto-tag', {'userId': u, 'messageId': m}) for u, m in pairs))
            expected = len(set(ids))  # ids of one millisecond collide: BullMQ keeps the first
        else:
            whitenote_huey.enqueue_all([whitenote_huey.auto_tag.s(u, m) for u, m in pairs])
        ran = JobState.select().where(JobState.message_id.in_([m for _, m in pairs]) & (JobState.status == 'done'))
        common.wait_until(lambda: ran.count() == expected, 600, interval=0.05, what='the drain')
        return consumer.peak_rss_mb()


def batch_cpu(consumer: common.Consumer, pairs: list) -> float:
    """CPU seconds the consumer spent running these auto-tags, enqueued straight on Huey."""
    import whitenote_huey
    cpu = consumer.cpu_seconds()
    whitenote_huey.enqueue_all([whitenote_huey.auto_tag.s(user_id, message_id) for user_id, message_id in pairs])
    common.wait_until(lambda: done(pairs), 600, interval=0.02, what='the batch')
    return consumer.cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--samples', type=int, default=200, help='jobs timed on each path')
    parser.add_argument('--jobs', type=int, default=300, help='auto-tags per CPU batch (4 batches)')
    parser.add_argument('--drain', type=int, default=3000, help='auto-tags per memory drain (3 drains)')
    args = parser.parse_args()
    print(common.machine())
    with common.worker_services() as (fake, workdir, env):
        import services

        import whitenote_huey
        queue = services.WebAppQueue(env['REDIS_URL'], 'whitenote-tasks')
        env = dict(env, BULLMQ_QUEUE='whitenote-tasks', ENCRYPTION_KEY=SECRET)
        plain_key, secret_key = fake.api_key, encrypted(fake.api_key)
        with common.Consumer(workdir, dict(env, LOG_FORMAT='json')) as consumer:
            common.wait_until(lambda: "taking the web app's jobs" in consumer.log(), 60, what='the taker')
            # 1. Enqueue-to-start, the web app's client against Huey's own enqueue.
            pause = (0.05, 0.3)
            via_bullmq = messages(fake, args.samples, plain_key)
            added = queue.add_paced([('auto-tag', {'userId': u, 'messageId': m}) for u, m in via_bullmq], pause)
            direct = messages(fake, args.samples, plain_key)
            enqueued = {}
            for user_id, message_id in direct:
                time.sleep(random.uniform(*pause))
                enqueued[message_id] = time.time()
                whitenote_huey.auto_tag(user_id, message_id)
            common.wait_until(lambda: done(via_bullmq + direct), 120, what='the timed jobs')
            starts = started_at(consumer)
            bullmq = [starts[m] - at for (_, m), (_, at) in zip(via_bullmq, added, strict=True)]
            huey = [starts[m] - enqueued[m] for _, m in direct]
            # 2. CPU per job, plain and encrypted keys, alternating, after a job of each: the
            # key is derived once per process (tens of ms), as a client is made once per key.
            batch_cpu(consumer, messages(fake, 1, plain_key) + messages(fake, 1, secret_key))
            cpu = {'plain': 0.0, 'encrypted': 0.0}
            for _ in range(2):
                for name, key in (('plain', plain_key), ('encrypted', secret_key)):
                    cpu[name] += batch_cpu(consumer, messages(fake, args.jobs, key))
        # 3. Peak memory over a drain, without the taker, with it, with it and encrypted keys,
        # each on the same number of messages (the start-up sweep reads them all).
        without = drain_peak(workdir, dict(env, BULLMQ_QUEUE=''), fresh_messages(fake, args.drain, plain_key))
        taker = drain_peak(workdir, env, fresh_messages(fake, args.drain, plain_key), queue)
        taker_encrypted = drain_peak(workdir, env, fresh_messages(fake, args.drain, secret_key), queue)
    ms = lambda values, q: 1000 * common.percentile(values, q)  # noqa: E731
    print('run_consumer.sh options: %s' % ' '.join(common.run_consumer_options()))
    print('1. enqueue-to-start, %d jobs each, one at a time:' % args.samples)
    print('   web app (BullMQ) -> taker -> Huey: median %6.2f ms  p99 %6.2f ms' % (ms(bullmq, 0.5), ms(bullmq, 0.99)))
    print('   Huey enqueue (baseline):           median %6.2f ms  p99 %6.2f ms' % (ms(huey, 0.5), ms(huey, 0.99)))
    print('   ratio of medians %.2fx; goal median <= 20 ms and p99 <= 100 ms: %s' % (
        common.median(bullmq) / common.median(huey),
        'met' if ms(bullmq, 0.5) <= 20 and ms(bullmq, 0.99) <= 100 else 'MISSED'))
    jobs = 2 * args.jobs
    ratio = cpu['encrypted'] / cpu['plain']
    print('2. CPU per auto-tag: plain key %.2f ms, encrypted key %.2f ms (%d jobs each): %.3fx; goal within 5%%: %s'
          % (1000 * cpu['plain'] / jobs, 1000 * cpu['encrypted'] / jobs, jobs, ratio,
             'met' if ratio <= 1.05 else 'MISSED'))
    print('3. consumer peak memory over a drain of %d auto-tags: without the taker %.1f MB, with it %.1f MB '
          '(+%.1f MB), with it and encrypted keys %.1f MB (+%.1f MB); goal under 80 MB with the taker: %s'
          % (args.drain, without, taker, taker - without, taker_encrypted, taker_encrypted - without,
             'met' if taker < 80 else 'MISSED'))


if __name__ == '__main__':
    main()
