"""Drain rate: messages auto-tagged per second end to end, against Huey's no-op floor.

    python bench/drain.py [--messages 3000] [--rounds 3] [--profile]

Starts its own redis-server, PostgreSQL database and fake model (answering at once).
Each round fills the queue, then starts a consumer and times it from its first dequeue
to its last job done: once Huey's consumer on a no-op task (bench/noop_app.py: the
worker's storage, serializer and task options, run_consumer.sh's options), once
run_consumer.sh itself on auto_tag jobs.  Also reports the worker consumer's peak
memory over its run.  ``--profile`` instead runs the auto-tag jobs in this process,
one after another, under cProfile, to show where a job's time goes.
"""
import argparse
import cProfile
import os
import pstats
import sys
import time

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
    from models import database
    database.execute_sql('TRUNCATE "whitenote_huey_job", "MessageTag", "Tag"')


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


def profile(pairs: list) -> None:
    import whitenote_huey
    reset_worker_state()
    huey = whitenote_huey.huey
    for user_id, message_id in pairs:
        whitenote_huey.auto_tag(user_id, message_id)
    tasks = [huey.dequeue() for _ in pairs]
    whitenote_huey.prepare_worker()
    profiler = cProfile.Profile(time.process_time)  # CPU time: what limits the drain
    started = time.perf_counter()
    profiler.enable()
    for task in tasks:
        huey.execute(task)
    profiler.disable()
    elapsed = time.perf_counter() - started
    assert done_count() == len(pairs)
    print('%d jobs in one thread under cProfile: %.2f ms each' % (len(pairs), 1000 * elapsed / len(pairs)))
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats('cumulative').print_stats(40)
    stats.sort_stats('tottime').print_stats(25)
    cumulative = {}
    for (filename, _, name), (_, _, _, cumtime, _) in stats.stats.items():
        key = (os.path.basename(filename), name)
        cumulative[key] = cumulative.get(key, 0) + cumtime
    print("Where a job's time goes (cumulative time, share of the whole run):")
    shares = {label: 100 * cumulative.get(key, 0) / elapsed for label, key in PARTS}
    for label, share in shares.items():
        print('  %-50s %5.1f%%' % (label, share))
    whole = shares.pop(PARTS[0][0])
    print('  %-50s %5.1f%%' % ('rest of auto_tag (BEGIN/COMMIT, hashing, parsing...)', whole - sum(shares.values())))
    print('  %-50s %5.1f%%' % ('Huey.execute around the task (signals, revoke key)', 100 - whole))


PARTS = [
    ('the whole auto_tag task', ('whitenote_huey.py', 'auto_tag')),
    ('model call: openai client + HTTP (ask_model)', ('whitenote_huey.py', 'ask_model')),
    ('pool checkout', ('pool.py', '_connect')),
    ('state row read (JobState.lookup)', ('models.py', 'lookup')),
    ('message read (Message.content_of)', ('models.py', 'content_of')),
    ('settings read (AiConfig.for_user)', ('models.py', 'for_user')),
    ('claim: state written running (JobState.claim)', ('models.py', 'claim')),
    ("user's tag names for the prompt (Tag.names_used_by)", ('models.py', 'names_used_by')),
    ('tag links (apply_auto_tags)', ('whitenote_huey.py', 'apply_auto_tags')),
    ('state written done (JobState.write)', ('models.py', 'write')),
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
        pairs = make_messages(fake, 300 if args.profile else args.messages)
        if args.profile:
            profile(pairs)
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
