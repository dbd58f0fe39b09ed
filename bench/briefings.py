"""Briefings at scale: 10,000 users, a model answering in 100 ms, 50 workers.

    python bench/briefings.py [--users 10000] [--messages 3] [--delay 0.1] [--workers 50]

Starts its own redis-server, PostgreSQL database and fake model.  Every user has the
briefing on (briefingTime 00:00, so it is due whatever the hour), AI settings that
point at the fake model, and a few messages on the previous local day.  run_consumer.sh
runs with WORKERS and its periodic scheduler off (``-n``): the benchmark enqueues
``schedule_briefings`` itself, as the scheduler would, at a known moment, and again
every 60 s while briefings are left (as the scheduler does every minute).  A warm-up
of 2 x workers briefings of other users comes first.  Times from that enqueue to the
last briefing recorded done, against the ideal users x delay / workers, and checks
there is exactly one briefing per user and one model request per briefing.  Then Huey
alone: the same consumer options on as many tasks that only wait as long as the model
(bench/noop_app.py), against the same ideal.
"""
import argparse
import calendar
import datetime
import re
import time

import common

GOAL = 1.3  # wall time at most this many times the ideal
ANSWER = '📝 昨日回顾\n读了书。\n\n💡 关键洞察\n少即是多。\n\n🎯 今日建议\n继续读。'


def make_users(fake, count: int, messages: int, day: datetime.date) -> list[str]:
    """``count`` users with the briefing due, each with ``messages`` messages on ``day``."""
    import whitenote_huey
    from models import AiConfig
    from models import Message
    from models import User
    from models import database
    from models import new_id
    start, _ = whitenote_huey.local_day_bounds(day)
    ids = [new_id() for _ in range(count)]
    with database.atomic():
        for first in range(0, count, 1000):
            batch = ids[first:first + 1000]
            User.insert_many([{'id': user_id, 'email': '%s@bench.example' % user_id}
                              for user_id in batch]).execute()
            AiConfig.insert_many([{'user': user_id, 'openai_base_url': fake.url,
                                   'openai_api_key': fake.api_key, 'briefing_time': '00:00'}
                                  for user_id in batch]).execute()
            Message.insert_many([{'author': user_id, 'content': 'Note %d of the day: reading, work' % n,
                                  'created_at': start + datetime.timedelta(hours=8 + n),
                                  'updated_at': start + datetime.timedelta(hours=8 + n)}
                                 for user_id in batch for n in range(messages)]).execute()
    return ids


def done(day: datetime.date) -> int:
    from models import Briefing
    return Briefing.select().where((Briefing.day == day) & (Briefing.status == 'done')).count()


def last_done(day: datetime.date) -> float:
    """When the last briefing of ``day`` was recorded done (naive UTC in the row), as epoch."""
    from models import Briefing
    latest = (Briefing
              .select(Briefing.updated_at)
              .where((Briefing.day == day) & (Briefing.status == 'done'))
              .order_by(Briefing.updated_at.desc())
              .scalar())
    return calendar.timegm(latest.timetuple()) + latest.microsecond / 1e6


def dispatches(log: str) -> list[tuple[float, int]]:
    """How long each schedule_briefings run took and how many it enqueued, from the log."""
    seconds = [float(s) for s in re.findall(r'schedule_briefings: \S+ executed in ([\d.]+)s', log)]
    counts = [int(n) for n in re.findall(r'\[daily-briefing\] \S+: enqueued for (\d+) user', log)]
    counts += [0] * (len(seconds) - len(counts))  # a run that found none due logs no count
    return list(zip(seconds, counts[len(counts) - len(seconds):], strict=True))  # not a start-up pass's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--users', type=int, default=10000)
    parser.add_argument('--messages', type=int, default=3, help="each user's messages yesterday")
    parser.add_argument('--delay', type=float, default=0.1, help="the model's answer time, seconds")
    parser.add_argument('--workers', type=int, default=50)
    parser.add_argument('--worker-type', default='thread')
    args = parser.parse_args()
    print(common.machine())
    from fake_model import text
    with common.worker_services() as (fake, workdir, env):
        import whitenote_huey
        fake.default = text(ANSWER, delay=args.delay)
        day = whitenote_huey.local_now().date() - datetime.timedelta(days=1)
        env = dict(env, WORKERS=str(args.workers), WORKER_TYPE=args.worker_type)
        huey = whitenote_huey.huey
        with common.Consumer(workdir, env, args=['-n']) as consumer:
            # The users come once the consumer's start-up pass is over: it enqueues the
            # briefings due when it runs, which would start them before the trigger.
            common.wait_until(lambda: '[sweep] start-up pass' in consumer.log(), 120, 0.1,
                              what="the consumer's start-up pass")
            warm_up = make_users(fake, 2 * args.workers, args.messages, day)
            users = make_users(fake, args.users, args.messages, day)
            print('%d users with %d messages each on %s, %d warm-up users' % (
                len(users), args.messages, day, len(warm_up)))
            for user_id in warm_up:
                whitenote_huey.daily_briefing(user_id, day)
            common.wait_until(lambda: done(day) == len(warm_up), 300, 0.05, what='the warm-up briefings')
            fake.requests.clear()
            cpu = consumer.cpu_seconds()
            started = time.time()
            huey.enqueue(whitenote_huey.schedule_briefings.s())
            ticks, total = 1, len(warm_up) + len(users)
            while done(day) < total:
                if time.time() - started >= 60 * ticks:
                    huey.enqueue(whitenote_huey.schedule_briefings.s())
                    ticks += 1
                if time.time() - started > 3600:
                    raise SystemExit('benchmark stalled: %d of %d briefings done' % (done(day), total))
                time.sleep(0.25)
            wall = last_done(day) - started
            cpu = consumer.cpu_seconds() - cpu
            peak = consumer.peak_rss_mb()
            common.wait_until(lambda: huey.pending_count() == 0, 600, 0.1, what='an empty queue')
        dispatched = dispatches(consumer.log())
        from models import Briefing
        from models import Message
        briefings = (Message
                     .select()
                     .where(Message.content.startswith(whitenote_huey.BRIEFING_TITLE))
                     .count())
        assert briefings == total, 'briefing messages: %d, users: %d' % (briefings, total)
        assert Briefing.select().where(Briefing.status != 'done').count() == 0
        requests = len(fake.chat_requests())
        retried = list(Briefing
                       .select(Briefing.attempts, Briefing.last_error)
                       .where((Briefing.day == day) & (Briefing.attempts > 1))
                       .tuples())
        errors = sorted({error for _, error in retried if error})
        print('briefings tried more than once: %d%s' % (len(retried), ''.join(
            '\n  ' + error[:200] for error in errors[:5])))
        log = consumer.log()
        print('consumer log: %d retries, %d errors' % (log.count(' will retry in '), log.count(' ERROR ')))
        assert requests == len(users), 'model requests: %d for %d briefings' % (requests, len(users))
        floor = common.huey_alone(workdir, env, args.delay, args.users, args.worker_type, args.workers)
    ideal = args.users * args.delay / args.workers
    print('run_consumer.sh, WORKERS=%d WORKER_TYPE=%s, periodic scheduler off (-n), '
          'schedule_briefings enqueued by the benchmark %d time(s)' % (args.workers, args.worker_type, ticks))
    print('dispatch runs (schedule_briefings, as Huey timed them): %s'
          % ', '.join('%.2f s enqueueing %d' % run for run in dispatched[-ticks:]))
    print('briefings %d, model requests %d, model answering in %.0f ms' % (args.users, requests, 1000 * args.delay))
    print('ideal %.1f s, wall %.1f s = %.2fx ideal (goal within %.1fx: %s)' % (
        ideal, wall, wall / ideal, GOAL, 'met' if wall / ideal <= GOAL else 'MISSED'))
    print('Huey alone, the same consumer options, on %d tasks that only wait %.0f ms: %.1f s = %.2fx ideal'
          % (args.users, 1000 * args.delay, floor, floor / ideal))
    print('consumer CPU %.1f s (%.2f ms per briefing), peak RSS %.1f MB' % (
        cpu, 1000 * cpu / args.users, peak))


if __name__ == '__main__':
    main()
