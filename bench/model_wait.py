"""Waiting on the model: 500 auto-tags against a fake model that answers in 200 ms.

    python bench/model_wait.py [--jobs 500] [--delay 0.2] [--workers 5 20 50] [--types thread greenlet process]

Starts its own redis-server, PostgreSQL database and fake model, then for each worker
type and count runs run_consumer.sh (WORKERS, WORKER_TYPE), warms it up, puts all the
jobs on the queue at once (one Redis pipeline) and times them until the last one is
done (its finish time as the worker recorded it).  Prints wall time against the ideal
jobs x delay / workers, and Huey alone on tasks that only wait as long (bench/noop_app.py,
the same consumer options), and draws bench/model_wait.png.
"""
import argparse
import calendar
import os

import common

CHART = os.path.join(common.BENCH, 'model_wait.png')
GOALS = {20: 1.25, 50: 1.5}  # wall time at most this many times the ideal


def make_messages(fake, count: int, users: int = 50) -> list[tuple[str, str]]:
    import services
    # The briefing off: the consumer's every-minute dispatcher then finds nothing to add.
    authors = [services.make_user(config=services.model_config(fake, enable_briefing=False))
               for _ in range(users)]
    return [(authors[i % users].id, services.make_message(authors[i % users], 'Note %d to tag' % i).id)
            for i in range(count)]


def last_finish(pairs: list) -> float:
    """When the last of these jobs was recorded done (the worker's naive-UTC clock, as epoch)."""
    from models import JobState
    latest = (JobState
              .select(JobState.updated_at)
              .where(JobState.message_id.in_([message_id for _, message_id in pairs]))
              .order_by(JobState.updated_at.desc())
              .scalar())
    return calendar.timegm(latest.timetuple()) + latest.microsecond / 1e6


def done() -> int:
    """Jobs done since the last reset: a cheap query, as the bench shares the fake model's CPU."""
    from models import JobState
    return JobState.select().where(JobState.status == 'done').count()


def run(workdir: str, env: dict, warm_up: list, pairs: list, worker_type: str, workers: int) -> dict:
    import whitenote_huey
    from models import JOB_TABLE
    from models import database
    database.execute_sql('TRUNCATE %s, "MessageTag", "Tag"' % JOB_TABLE)
    env = dict(env, WORKERS=str(workers), WORKER_TYPE=worker_type)
    with common.Consumer(workdir, env) as consumer:
        for user_id, message_id in warm_up:
            whitenote_huey.auto_tag(user_id, message_id)
        common.wait_until(lambda: done() == len(warm_up), 120, 0.02, what='the warm-up jobs')
        cpu = consumer.cpu_seconds()
        started = common.enqueue_at_once(whitenote_huey.huey, [
            whitenote_huey.auto_tag.s(user_id, message_id) for user_id, message_id in pairs])
        common.wait_until(lambda: done() == len(warm_up) + len(pairs), 600, 0.02, what='every job done')
        cpu = consumer.cpu_seconds() - cpu
        peak = consumer.peak_rss_mb()
    return {'wall': last_finish(pairs) - started, 'cpu': cpu, 'rss': peak}


def chart(results: dict, jobs: int, delay: float) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(8, 5), dpi=110)
    counts = sorted({workers for by_count in results.values() for workers in by_count})
    span = range(min(counts), max(counts) + 1)
    axes.plot(span, [jobs * delay / w for w in span], color='grey', linestyle='--',
              label='ideal: %d x %.1f s / workers' % (jobs, delay))
    goals = [(w, factor * jobs * delay / w) for w, factor in GOALS.items() if w in counts]
    if goals:
        axes.plot(*zip(*goals, strict=True), linestyle='none', marker='_', markersize=18, color='black',
                  label='goal: %s' % ', '.join('%.2fx at %d' % (GOALS[w], w) for w, _ in goals))
    plural = {'thread': 'threads', 'greenlet': 'greenlets', 'process': 'processes'}
    colors = iter(('tab:blue', 'tab:orange', 'tab:green', 'tab:red'))
    for (worker_type, by_count), marker in zip(sorted(results.items()), 'os^v', strict=False):
        color, xs = next(colors), sorted(by_count)
        name = plural.get(worker_type, worker_type)
        axes.plot(xs, [by_count[w]['wall'] for w in xs], marker=marker, color=color,
                  label='auto-tag, %s (x ideal: %s)' % (name, ', '.join(
                      '%.2f' % (by_count[w]['wall'] / (jobs * delay / w)) for w in xs)))
        axes.plot(xs, [by_count[w]['floor'] for w in xs], color=color, linestyle=':', linewidth=1,
                  label='Huey alone, %s, tasks that only wait' % name)
    axes.set_ylim(0, 1.1 * max(by_count[w]['wall'] for by_count in results.values() for w in by_count))
    axes.set_xlabel('workers')
    axes.set_ylabel('wall time, seconds')
    axes.set_title('%d auto-tags, model answering in %d ms (lower is better)' % (jobs, delay * 1000))
    axes.set_xticks(counts)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(CHART)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--jobs', type=int, default=500)
    parser.add_argument('--delay', type=float, default=0.2)
    parser.add_argument('--workers', type=int, nargs='+', default=[5, 20, 50])
    parser.add_argument('--types', nargs='+', default=['thread', 'greenlet', 'process'])
    parser.add_argument('--no-chart', action='store_true')
    args = parser.parse_args()
    print(common.machine())
    from fake_model import tags
    results = {}
    with common.worker_services() as (fake, workdir, env):
        fake.default = tags('alpha', 'beta', delay=args.delay)
        pairs = make_messages(fake, args.jobs + 2 * max(args.workers))
        warm_up, pairs = pairs[args.jobs:], pairs[:args.jobs]
        for worker_type in args.types:
            for workers in args.workers:
                result = run(workdir, env, warm_up[:2 * workers], pairs, worker_type, workers)
                result['floor'] = common.huey_alone(workdir, env, args.delay, args.jobs, worker_type,
                                                    workers)
                results.setdefault(worker_type, {})[workers] = result
                fake.requests.clear()
    ideal = {w: args.jobs * args.delay / w for w in args.workers}
    print('%d jobs, model answering in %.0f ms, run_consumer.sh with WORKERS and WORKER_TYPE'
          % (args.jobs, 1000 * args.delay))
    print('%-9s %7s %8s %8s %7s %9s %9s %8s  %s' % ('type', 'workers', 'ideal s', 'wall s', 'x ideal',
                                                     'Huey x', 'CPU s', 'RSS MB', 'goal'))
    for worker_type, by_count in results.items():
        for workers, result in sorted(by_count.items()):
            ratio = result['wall'] / ideal[workers]
            goal = GOALS.get(workers)
            verdict = '' if goal is None else 'within %.2fx: %s' % (goal, 'met' if ratio <= goal else 'MISSED')
            print('%-9s %7d %8.2f %8.2f %7.2f %9.2f %9.2f %8.1f  %s' % (
                worker_type, workers, ideal[workers], result['wall'], ratio,
                result['floor'] / ideal[workers], result['cpu'], result['rss'], verdict))
    print('Huey x: Huey alone on tasks that only wait as long, same consumer options, x ideal')
    if not args.no_chart:
        chart(results, args.jobs, args.delay)
        print('chart: %s' % CHART)


if __name__ == '__main__':
    main()
