"""cleanup-versions on SQLite and PostgreSQL: what it keeps, batching, races, task and CLI."""
import datetime
import io
import itertools
import logging
import os
import pty
import random
import subprocess
import sys
import threading

import pytest
from services import cli
from services import drain
from services import make_message
from services import make_user
from services import make_versions
from services import subprocess_env
from services import wait_for

import models
import whitenote_huey
from models import MessageVersion
from whitenote_huey import prune_versions

pytestmark = pytest.mark.usefixtures('db')

T0 = datetime.datetime(2024, 3, 1, 8, 0)


def minutes(*offsets: int) -> list[datetime.datetime]:
    return [T0 + datetime.timedelta(minutes=m) for m in offsets]


def history(count: int, keep_order: bool = False, seed: int = 0, message=None):
    """A message with ``count`` versions a minute apart, inserted in shuffled order."""
    message = message or make_message(make_user(), 'edited often')
    times = minutes(*range(count))
    if not keep_order:
        random.Random(seed).shuffle(times)
    return message, make_versions(message, times)


def remaining(message_id: str) -> set:
    return {row.id for row in MessageVersion.select(MessageVersion.id)
            .where(MessageVersion.message == message_id)}


def survivors(rows: list[tuple], keep: int) -> set:
    """The oracle: the first version and the newest keep - 1, by (createdAt, id)."""
    ordered = sorted(rows)
    return {ordered[0][1]} | {version_id for _, version_id in ordered[-(keep - 1):]}


def all_version_ids() -> set:
    return {row.id for row in MessageVersion.select(MessageVersion.id)}


def test_keeps_the_first_and_the_newest_keep_minus_one():
    message, rows = history(10)
    assert prune_versions(keep=4) == (6, 1)
    ordered = [version_id for _, version_id in sorted(rows)]
    assert remaining(message.id) == {ordered[0], *ordered[-3:]}


def test_default_keeps_fifty():
    message, rows = history(52)
    assert prune_versions() == (2, 1)
    assert remaining(message.id) == survivors(rows, 50)


def test_exactly_keep_is_untouched_and_keep_plus_one_loses_the_second_oldest():
    at_limit, at_rows = history(5, seed=1)
    over, over_rows = history(6, seed=2)
    fewer, fewer_rows = history(1, seed=3)
    assert prune_versions(keep=5) == (1, 1)
    assert remaining(at_limit.id) == {version_id for _, version_id in at_rows}
    assert remaining(fewer.id) == {version_id for _, version_id in fewer_rows}
    second_oldest = sorted(over_rows)[1][1]
    assert remaining(over.id) == {version_id for _, version_id in over_rows} - {second_oldest}


@pytest.mark.parametrize('order', list(itertools.permutations(['va', 'vm', 'vz'])),
                         ids='-'.join)
def test_equal_created_at_is_broken_by_id(order):
    message = make_message(make_user(), 'saved twice in one millisecond')
    make_versions(message, [T0] * 3, ids=list(order))
    assert prune_versions(keep=2) == (1, 1)
    assert remaining(message.id) == {'va', 'vz'}


def test_equal_created_at_at_the_boundary():
    message = make_message(make_user(), 'tie at the cut')
    rows = make_versions(message, minutes(0, 5, 5, 5, 9), ids=['first', 'tie-c', 'tie-a', 'tie-b', 'last'])
    assert prune_versions(keep=3) == (2, 1)
    assert remaining(message.id) == {'first', 'tie-c', 'last'} == survivors(rows, 3)


def test_message_scope_touches_only_that_message():
    target, target_rows = history(8, seed=4)
    other, other_rows = history(8, seed=5)
    assert prune_versions(keep=3, message_id=target.id) == (5, 1)
    assert remaining(target.id) == survivors(target_rows, 3)
    assert len(remaining(other.id)) == 8
    assert prune_versions(keep=3, message_id='no-such-message') == (0, 0)


def test_dry_run_deletes_nothing_and_counts_what_a_run_deletes():
    for seed, count in enumerate((3, 7, 12, 4, 30)):
        history(count, seed=seed)
    before = all_version_ids()
    would = prune_versions(keep=4, dry_run=True, batch_size=2)
    assert all_version_ids() == before
    assert would == prune_versions(keep=4) == (3 + 8 + 26, 3)


@pytest.mark.parametrize('keep', [1, 0, -5])
def test_keep_below_two_is_refused(keep):
    message, rows = history(5)
    with pytest.raises(ValueError, match='keep must be at least 2'):
        prune_versions(keep=keep)
    assert len(remaining(message.id)) == 5


def many_messages(count: int = 12) -> dict:
    """Messages with 1 to 15 versions (some under, some at, most over keep=4), by id."""
    user = make_user()
    data = {}
    for n in range(count):
        message = make_message(user, 'note %d' % n)
        data[message.id] = history(1 + (n * 7) % 15, seed=n, message=message)[1]
    return data


def expected_counts(data: dict, keep: int) -> tuple[int, int]:
    over = [len(rows) - keep for rows in data.values() if len(rows) > keep]
    return sum(over), len(over)


def assert_pruned(data: dict, keep: int) -> None:
    for message_id, rows in data.items():
        assert remaining(message_id) == survivors(rows, keep), message_id


def test_small_batches_end_like_one_batch():
    data = many_messages()
    calls = []
    result = prune_versions(keep=4, batch_size=2, progress=lambda *done: calls.append(done))
    assert result == expected_counts(data, 4)
    assert_pruned(data, 4)
    over = sum(1 for rows in data.values() if len(rows) > 4)
    assert [scanned for scanned, _ in calls] == list(range(2, over, 2)) + [over]
    assert calls[-1][1] == result[0]
    assert prune_versions(keep=4, batch_size=1000) == (0, 0)


def test_batches_hold_at_most_batch_versions():
    user = make_user()
    data = {}
    for n, count in enumerate((10, 10, 10, 40, 3, 10), start=1):
        message = make_message(user, 'note %d' % n, id='m%02d' % n)
        data[message.id] = history(count, seed=n, message=message)[1]
    calls = []
    result = prune_versions(keep=4, batch_versions=25, progress=lambda *done: calls.append(done))
    assert [scanned for scanned, _ in calls] == [2, 3, 4, 5]
    assert result == expected_counts(data, 4) == (6 + 6 + 6 + 36 + 6, 5)
    assert_pruned(data, 4)


def test_runs_at_once_end_like_one():
    """Overlapping batches of different sizes: on PostgreSQL they deadlock unless they take turns."""
    user = make_user()
    data = {}
    for n in range(40):
        message = make_message(user, 'note %d' % n)
        data[message.id] = history(30 + n % 20, seed=n, message=message)[1]
    barrier = threading.Barrier(3)
    results, errors = [], []

    def run(batch_size):
        try:
            with models.database.connection_context():
                barrier.wait(10)
                results.append(prune_versions(keep=4, batch_size=batch_size))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(size,)) for size in (2, 3, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(results) == 3
    assert_pruned(data, 4)
    assert tuple(map(sum, zip(*results, strict=True))) == expected_counts(data, 4)


class Interrupted(Exception):
    pass


def test_a_run_stopped_midway_then_rerun_ends_like_one_clean_run():
    data = many_messages()
    done = []

    def stop_after_first_batch(scanned, deleted):
        done.append(deleted)
        raise Interrupted

    with pytest.raises(Interrupted):
        prune_versions(keep=4, batch_size=3, progress=stop_after_first_batch)
    first_batch = sorted(m for m, rows in data.items() if len(rows) > 4)[:3]
    for message_id, rows in data.items():
        if message_id in first_batch:
            assert remaining(message_id) == survivors(rows, 4)
        else:
            assert len(remaining(message_id)) == len(rows)
    deleted, messages = prune_versions(keep=4, batch_size=3)
    assert (done[0] + deleted, 3 + messages) == expected_counts(data, 4)
    assert_pruned(data, 4)


def test_versions_added_during_a_run_never_cost_the_first_or_the_newest():
    data = many_messages(16)
    ids = sorted(data)
    lock = threading.Lock()
    stop = threading.Event()
    clock = itertools.count(1)

    def add_version(message_id):
        with lock:
            when = T0 + datetime.timedelta(days=1, seconds=next(clock))
        rows = make_versions(message_id, [when])
        with lock:
            data[message_id] += rows

    def web_app():
        pick = random.Random(7)
        with models.database.connection_context():
            while not stop.is_set():
                add_version(pick.choice(ids))
                stop.wait(0.002)

    def between_batches(scanned, deleted):
        add_version(ids[0])    # already pruned
        add_version(ids[-1])   # not reached yet

    writer = threading.Thread(target=web_app)
    writer.start()
    try:
        prune_versions(keep=4, batch_size=1, progress=between_batches)
    finally:
        stop.set()
        writer.join(30)
    for message_id, rows in data.items():
        ordered = [version_id for _, version_id in sorted(rows)]
        assert {ordered[0], *ordered[-3:]} <= remaining(message_id), message_id
    prune_versions(keep=4)
    assert_pruned(data, 4)


@pytest.mark.parametrize('db', ['postgresql'], indirect=True)
def test_postgresql_delete_ranked_before_a_concurrent_insert_keeps_the_newest(db):
    """The DELETE waits on a row lock while the web app commits a newer version."""
    import psycopg2
    message, rows = history(6, keep_order=True)
    ordered = [version_id for _, version_id in sorted(rows)]
    web_app = psycopg2.connect(db.url)
    cursor = web_app.cursor()
    cursor.execute('SELECT 1 FROM "MessageVersion" WHERE id = %s FOR UPDATE', (ordered[1],))
    outcome = []

    def run():
        with models.database.connection_context():
            outcome.append(prune_versions(keep=3))

    pruner = threading.Thread(target=run)
    pruner.start()
    try:
        wait_for(lambda: models.database.execute_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'").fetchone()[0],
            what='the DELETE to wait on the locked version')
        cursor.execute('INSERT INTO "MessageVersion" (id, content, "createdAt", "messageId") '
                       "VALUES ('newest', 'edited during the delete', %s, %s)",
                       (T0 + datetime.timedelta(days=1), message.id))
        web_app.commit()
        pruner.join(30)
    finally:
        web_app.close()
    assert outcome == [(3, 1)]
    assert remaining(message.id) == {ordered[0], ordered[-2], ordered[-1], 'newest'}
    assert prune_versions(keep=3) == (1, 1)
    assert remaining(message.id) == {ordered[0], ordered[-1], 'newest'}


def test_task_runs_through_the_queue(redis_queue, caplog):
    data = many_messages()
    caplog.set_level(logging.INFO, logger='huey.whitenote')
    whitenote_huey.cleanup_versions(keep=4)
    assert drain(redis_queue) == 1
    assert_pruned(data, 4)
    deleted, messages = expected_counts(data, 4)
    logged = [r.getMessage() for r in caplog.records if r.name == 'huey.whitenote']
    assert logged[0] == '[cleanup-versions] all messages started (keep 4)'
    assert logged[-1].startswith('[cleanup-versions] all messages done in ')
    assert logged[-1].endswith(': deleted %d versions across %d messages' % (deleted, messages))


def test_task_with_bad_keep_fails_without_retries(redis_queue, caplog):
    message, rows = history(5)
    whitenote_huey.cleanup_versions(keep=1, message_id=message.id)
    assert drain(redis_queue) == 1
    assert len(remaining(message.id)) == 5
    assert any(r.getMessage().startswith('[cleanup-versions] %s failed after' % message.id)
               and 'keep must be at least 2' in r.getMessage() for r in caplog.records)


def cli_env(db) -> dict:
    return {'DATABASE_URL': db.url, 'LOG_LEVEL': 'WARNING'}


def test_command_line_reports_and_prunes(db, tmp_path):
    data = many_messages()
    deleted, messages = expected_counts(data, 4)
    env, cwd = cli_env(db), str(tmp_path)
    dry = cli(env, cwd, 'cleanup-versions', '--keep', '4', '--dry-run')
    assert (dry.returncode, dry.stdout, dry.stderr) == (
        0, 'would delete %d versions across %d messages\n' % (deleted, messages), '')
    assert sum(len(remaining(m)) for m in data) == sum(len(rows) for rows in data.values())
    target = next(m for m, rows in data.items() if len(rows) == 8)
    one = cli(env, cwd, 'cleanup-versions', '--keep', '4', '--message', target)
    assert (one.returncode, one.stdout) == (0, 'deleted 4 versions across 1 messages\n')
    rest = cli(env, cwd, 'cleanup-versions', '--keep', '4')
    assert (rest.returncode, rest.stdout, rest.stderr) == (
        0, 'deleted %d versions across %d messages\n' % (deleted - 4, messages - 1), '')
    assert_pruned(data, 4)


def test_command_line_refuses_keep_below_two(db, tmp_path):
    message, rows = history(5)
    result = cli(cli_env(db), str(tmp_path), 'cleanup-versions', '--keep', '1')
    assert result.returncode == 2 and result.stdout == ''
    assert 'keep must be at least 2' in result.stderr
    assert len(remaining(message.id)) == 5


def test_command_line_shows_progress_on_a_terminal(db, tmp_path):
    """Under a pty, with the default keep of 50."""
    over, rows = history(53, seed=1)
    history(50, seed=2)
    master, slave = pty.openpty()
    process = subprocess.Popen([sys.executable, '-m', 'whitenote_huey', 'cleanup-versions'],
                               cwd=str(tmp_path), env=subprocess_env(cli_env(db)),
                               stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    terminal = b''
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        terminal += chunk
    os.close(master)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert stdout == 'deleted 3 versions across 1 messages\n'
    assert terminal.decode() == '\r\x1b[K1 messages scanned, 3 versions deleted\r\n'
    assert remaining(over.id) == survivors(rows, 50)


def test_progress_line_writes_only_to_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, expected in ((io.StringIO(), ''),
                             (Terminal(), '\r\x1b[K2 messages scanned, 9 versions deleted'
                                          '\r\x1b[K5 messages scanned, 20 versions deleted\n')):
        line = whitenote_huey.ProgressLine(stream, 'deleted')
        line(2, 9)
        line(5, 20)
        line.close()
        assert stream.getvalue() == expected
