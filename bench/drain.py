"""Drain rate: messages auto-tagged per second end to end, against Huey's no-op floor.

    python bench/drain.py [--messages 3000] [--rounds 3] [--profile]

Starts its own redis-server, PostgreSQL database and fake model (answering at once).
Each round fills the queue, then starts a consumer and times it from its first dequeue
to its last job done: once Huey's consumer on a no-op task (bench/noop_app.py: the
worker's storage, serializer and task options, run_consumer.sh's options), once
run_consumer.sh itself on auto_tag jobs.  Also reports the worker consumer's peak
memory over its run.  ``--profile`` instead samples the consumer draining auto-tag
jobs with py-spy (from bench/requirements.txt; it attaches to another process, which
needs root or ptrace permission), to show where its CPU goes.
"""
import argparse
import os
import subprocess

import common


def make_messages(fake, count: int, users: int = 20) -> list[tuple[str, str]]:
    """``count`` messages over ``users`` users whose AI settings point at the fake model."""
    import services

    from models import Message
    from models import utcnow
    # The briefing off: the consumer's every-minute dispatcher then finds nothing to add.
    authors = [services.make_user(config=services.model_config(fake, enable_briefing=False))
               for _ in range(users)]
    rows = [{'author': authors[i % users].id, 'content': 'Note %d about reading, work and travel' % i,
             'created_at': utcnow(), 'updated_at': utcnow()} for i in range(count)]
    Message.insert_many(rows).execute()
    return [(m.author_id, m.id) for m in Message.select(Message.id, Message.author).order_by(Message.id)]


def reset_worker_state() -> None:
    from models import JOB_TABLE
    from models import database
    database.execute_sql('TRUNCATE %s, "MessageTag", "Tag"' % JOB_TABLE)


def done_count() -> int:
    from models import JobState
    return JobState.select().where(JobState.status == 'done').count()


def run_floor(workdir: str, env: dict, pairs: list) -> tuple[float, float]:
    """Seconds from first dequeue to empty queue, and the consumer's CPU seconds meanwhile."""
    import noop_app
    for user_id, message_id in pairs:
        noop_app.noop(user_id, message_id)
    huey, total = noop_app.huey, len(pairs)
    with common.Consumer(workdir, env, app='noop_app.huey') as consumer:
        started = common.wait_until(lambda: huey.pending_count() < total, 60, what='the first dequeue')
        cpu = consumer.cpu_seconds()
        finished = common.wait_until(lambda: huey.pending_count() == 0, 600, interval=0.005,
                                     what='an empty queue')
        cpu = consumer.cpu_seconds() - cpu
    return finished - started, cpu


def run_worker(workdir: str, env: dict, pairs: list) -> tuple[float, float, float]:
    """Seconds from first dequeue to last job done, CPU seconds meanwhile, peak RSS in MB."""
    import whitenote_huey
    reset_worker_state()
    for user_id, message_id in pairs:
        whitenote_huey.auto_tag(user_id, message_id)
    huey, total = whitenote_huey.huey, len(pairs)
    with common.Consumer(workdir, env) as consumer:
        started = common.wait_until(lambda: huey.pending_count() < total, 60, what='the first dequeue')
        cpu = consumer.cpu_seconds()
        common.wait_until(lambda: huey.pending_count() == 0, 600, interval=0.005, what='an empty queue')
        finished = common.wait_until(lambda: done_count() == total, 600, interval=0.005,
                                     what='every job done')
        cpu = consumer.cpu_seconds() - cpu
        peak = consumer.peak_rss_mb()
    from models import MessageTag
    assert MessageTag.select().count() == 2 * total, 'the fake model tags every message twice'
    return finished - started, cpu, peak


def profile(workdir: str, env: dict, pairs: list, seconds: float = 15) -> None:
    """Sample the consumer draining auto-tag jobs with py-spy: where its CPU time goes.

    Only samples of a thread holding the GIL count (--gil), so time spent waiting on
    PostgreSQL, Redis or the model is left out: what remains is the CPU that limits
    the drain.  Each sample goes to the first part of PARTS its stack passes through.
    """
    import whitenote_huey
    reset_worker_state()
    for user_id, message_id in pairs:
        whitenote_huey.auto_tag(user_id, message_id)
    huey, total = whitenote_huey.huey, len(pairs)
    output = os.path.join(workdir, 'profile.txt')
    with common.Consumer(workdir, env) as consumer:
        common.wait_until(lambda: huey.pending_count() < total, 60, what='the first dequeue')
        subprocess.run([os.path.join(common.BIN, 'py-spy'), 'record', '--pid', str(consumer.process.pid),
                        '--gil', '--nonblocking', '--rate', '250', '--duration', str(int(seconds)),
                        '--format', 'raw', '--output', output], check=True, capture_output=True)
        left = huey.pending_count()
    if left == 0:
        raise SystemExit('the queue ran dry while sampling: give more --messages')
    shares, samples = {}, 0
    with open(output) as handle:
        for line in handle:
            stack, _, count = line.rstrip().rpartition(' ')
            label = next((label for label, frame in PARTS if frame in stack), 'the rest')
            shares[label] = shares.get(label, 0) + int(count)
            samples += int(count)
    print('%d samples of the consumer holding the GIL over %d s, %d jobs left in the queue'
          % (samples, seconds, left))
    print("Where the consumer's CPU goes while it drains auto-tag jobs:")
    for label, _ in PARTS + [('the rest', '')]:
        print('  %-58s %5.1f%%' % (label, 100 * shares.get(label, 0) / samples))


# In order: a sample counts for the first part whose frame its stack passes through.
PARTS = [
    ('model call: openai client, HTTP, JSON (ask_model)', 'ask_model (whitenote_huey'),
    ('logging (the job\'s and Huey\'s lines)', 'Logger.'),
    ('state row read (JobState.lookup)', 'JobState.lookup'),
    ('message read (Message.content_of)', 'Message.content_of'),
    ('settings read (AiConfig.for_user)', 'AiConfig.for_user'),
    ('claim: state written running (JobState.claim)', 'JobState.claim'),
    ("user's tag names for the prompt (Tag.names_used_by)", 'Tag.names_used_by'),
    ("message's tags (MessageTag.links_of)", 'MessageTag.links_of'),
    ('tags by name (Tag.upsert_all)', 'Tag.upsert_all'),
    ('links written (MessageTag.link)', 'MessageTag.link '),
    ('state written done (JobState.write)', 'JobState.write'),
    ('BEGIN and COMMIT', '_transaction.'),
    ('connection from the pool and back', 'ConnectionContext.'),
    ('rest of the job (hashing, prompt, parsing, bookkeeping)', 'auto_tag (whitenote_huey'),
    ('Huey around the job (revoke check, signals, timing)', 'Huey._execute'),
    ('Huey fetching the job (BZPOPMIN, unsign, unpickle)', 'Worker.loop'),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--messages', type=int, default=3000)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--profile', action='store_true')
    args = parser.parse_args()
    print(common.machine())
    with common.worker_services() as (fake, workdir, env):
        import whitenote_huey
        pairs = make_messages(fake, args.messages)
        if args.profile:
            profile(workdir, env, pairs)
            return
        floors, drains, peaks, floor_cpu, worker_cpu = [], [], [], [], []
        for _ in range(args.rounds):
            seconds, cpu = run_floor(workdir, env, pairs)
            floors.append(len(pairs) / seconds)
            floor_cpu.append(1000 * cpu / len(pairs))
            seconds, cpu, peak = run_worker(workdir, env, pairs)
            drains.append(len(pairs) / seconds)
            worker_cpu.append(1000 * cpu / len(pairs))
            peaks.append(peak)
            fake.requests.clear()
        assert whitenote_huey.huey.pending_count() == 0
    floor, drain = common.median(floors), common.median(drains)
    print('run_consumer.sh options: %s' % ' '.join(common.run_consumer_options()))
    print('%d messages per round, %d rounds (median); rates per round: floor %s, worker %s'
          % (len(pairs), args.rounds, ' '.join('%.0f' % r for r in floors), ' '.join('%.0f' % r for r in drains)))
    print('Huey no-op floor     %7.0f tasks/s' % floor)
    print('auto-tag end to end  %7.0f messages/s  = %.2f of the floor (goal >= 0.33: %s)'
          % (drain, drain / floor, 'met' if drain / floor >= 1 / 3 else 'MISSED'))
    print('consumer CPU per task: floor %.2f ms, auto-tag %.2f ms (median over rounds)'
          % (common.median(floor_cpu), common.median(worker_cpu)))
    print('consumer peak RSS    %7.1f MB (max over rounds; goal < 80 MB: %s)'
          % (max(peaks), 'met' if max(peaks) < 80 else 'MISSED'))


if __name__ == '__main__':
    main()
