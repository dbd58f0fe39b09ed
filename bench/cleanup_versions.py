"""cleanup-versions at scale: the batched prune against one plain DELETE, on PostgreSQL.

    python bench/cleanup_versions.py [--versions 1000000] [--messages 20000] [--keep 50]

Builds the web app's tables in a fresh database with VERSIONS versions over MESSAGES
messages (1 to 2 x average versions each, half of them sharing a "createdAt" with a
neighbour), copies it (CREATE DATABASE ... TEMPLATE), then prunes one copy with
whitenote_huey.prune_versions and the other with one DELETE ... WHERE id IN (SELECT ...
window function), each in a child process.  Prints time, longest transaction, Python
peak memory (tracemalloc), the child's max RSS and PostgreSQL's temporary-file bytes,
checks both copies end with the same rows, and drops both databases.  The server is
TEST_DATABASE_URL's (default postgresql://postgres@127.0.0.1:5432/test).
"""
import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from urllib.parse import urlparse

import psycopg2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))

from services import DATABASE_URL as SERVER_URL  # noqa: E402
from services import SCHEMA_SQL  # noqa: E402
from services import _admin as admin  # noqa: E402

BASELINE = '''
DELETE FROM "MessageVersion" WHERE id IN (
    SELECT id FROM (
        SELECT id,
               ROW_NUMBER() OVER (PARTITION BY "messageId" ORDER BY "createdAt" DESC, id DESC) AS newest_rank,
               ROW_NUMBER() OVER (PARTITION BY "messageId" ORDER BY "createdAt", id) AS oldest_rank
        FROM "MessageVersion") AS ranked
    WHERE newest_rank > %s AND oldest_rank > 1)
'''


def database_url(name: str) -> str:
    return urlparse(SERVER_URL)._replace(path='/' + name).geturl()


def version_counts(versions: int, messages: int) -> list[int]:
    """Per message 1 to 2 x average - 1 versions, spread evenly, summing to ``versions``."""
    average = versions // messages
    span = max(1, 2 * average - 1)
    counts = [1 + (n * 7919) % span for n in range(messages)]
    gap = versions - sum(counts)
    step = 1 if gap > 0 else -1
    n = 0
    while gap:
        if counts[n % messages] + step >= 1:
            counts[n % messages] += step
            gap -= step
        n += 1
    return counts


def build(name: str, versions: int, messages: int) -> None:
    """The web app's schema and the data, bulk loaded: COPY the counts, INSERT ... SELECT the rows."""
    admin('CREATE DATABASE %s' % name)
    conn = psycopg2.connect(database_url(name))
    with conn, conn.cursor() as cursor:
        cursor.execute(open(SCHEMA_SQL).read())
        cursor.execute('''INSERT INTO "User" (id, email, "passwordHash", "updatedAt")
                          VALUES ('bench-user', 'bench@example.org', 'x', now())''')
        cursor.execute('CREATE TEMP TABLE counts (n integer, versions integer)')
        rows = ''.join('%d\t%d\n' % pair for pair in enumerate(version_counts(versions, messages)))
        cursor.copy_from(io.StringIO(rows), 'counts')
        cursor.execute('''INSERT INTO "Message" (id, content, "createdAt", "updatedAt", "authorId")
                          SELECT 'c' || md5('message' || n), 'note ' || n,
                                 timestamp '2024-01-01', timestamp '2024-01-01', 'bench-user'
                          FROM counts''')
        cursor.execute('DROP INDEX "MessageVersion_messageId_createdAt_idx"')
        cursor.execute('''INSERT INTO "MessageVersion" (id, content, "createdAt", "messageId")
                          SELECT 'c' || md5(n || '/' || g), repeat(md5(g::text), 4),
                                 timestamp '2024-01-01' + (g / 2) * interval '1 minute',
                                 'c' || md5('message' || n)
                          FROM counts, generate_series(1, counts.versions) AS g''')
        cursor.execute('CREATE INDEX "MessageVersion_messageId_createdAt_idx" '
                       'ON "MessageVersion"("messageId", "createdAt" DESC)')
    conn.autocommit = True
    conn.cursor().execute('VACUUM ANALYZE')
    conn.close()


def fingerprint(name: str) -> tuple:
    conn = psycopg2.connect(database_url(name))
    try:
        cursor = conn.cursor()
        cursor.execute('SELECT count(*), sum(hashtext(id)::bigint), count(DISTINCT "messageId") '
                       'FROM "MessageVersion"')
        return cursor.fetchone()
    finally:
        conn.close()


def temp_bytes(name: str) -> int:
    conn = psycopg2.connect(SERVER_URL)
    try:
        cursor = conn.cursor()
        cursor.execute('SELECT temp_bytes FROM pg_stat_database WHERE datname = %s', (name,))
        return cursor.fetchone()[0]
    finally:
        conn.close()


def measure(how: str, name: str, keep: int) -> dict:
    """Run one side in a child process (its own RSS), in a scratch working directory."""
    env = dict(os.environ, DATABASE_URL=database_url(name), PYTHONPATH=ROOT,
               WHITENOTE_SECRET='bench', LOG_LEVEL='WARNING')
    env.pop('REDIS_URL', None)
    before = temp_bytes(name)
    with tempfile.TemporaryDirectory() as scratch:
        output = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', how, name,
                                 '--keep', str(keep)], cwd=scratch, env=env, check=True,
                                capture_output=True, text=True).stdout
    result = json.loads(output)
    time.sleep(1)  # let the server publish the finished backend's statistics
    result['temp_bytes'] = temp_bytes(name) - before
    return result


def child(how: str, keep: int) -> None:
    import whitenote_huey
    from models import database
    batches = []
    last = [time.perf_counter()]

    def timed(scanned, deleted):
        now = time.perf_counter()
        batches.append(now - last[0])
        last[0] = now

    with database.connection_context():
        tracemalloc.start()
        started = last[0] = time.perf_counter()
        if how == 'prune':
            deleted, messages = whitenote_huey.prune_versions(keep, progress=timed)
        else:
            with database.atomic():
                deleted = database.execute_sql(BASELINE, (keep - 1,)).rowcount
            messages = None
            batches.append(time.perf_counter() - started)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps(dict(seconds=seconds, deleted=deleted, messages=messages, peak=peak,
                          batches=len(batches), longest=max(batches, default=0.0),
                          maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))


def mb(value: int) -> str:
    return '%.1f MB' % (value / 1e6) if value >= 1e6 else '%.0f kB' % (value / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--versions', type=int, default=1_000_000)
    parser.add_argument('--messages', type=int, default=20_000)
    parser.add_argument('--keep', type=int, default=50)
    parser.add_argument('--child', nargs=2, metavar=('HOW', 'DATABASE'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.keep)
    if not 1 <= args.messages <= args.versions:
        parser.error('need 1 <= --messages <= --versions')
    pruned, baseline = 'whitenote_bench_%d_prune' % os.getpid(), 'whitenote_bench_%d_delete' % os.getpid()
    try:
        started = time.perf_counter()
        build(pruned, args.versions, args.messages)
        admin('CREATE DATABASE %s TEMPLATE %s' % (baseline, pruned))
        print('built %d versions over %d messages, twice, in %.1f s; keep %d'
              % (args.versions, args.messages, time.perf_counter() - started, args.keep))
        ours = measure('prune', pruned, args.keep)
        theirs = measure('baseline', baseline, args.keep)
        same = fingerprint(pruned) == fingerprint(baseline)
        print('%-22s %10s %16s %18s %12s %12s' % ('', 'time', 'longest txn', 'Python peak',
                                                  'child RSS', 'temp files'))
        for label, run in (('prune_versions', ours), ('one DELETE statement', theirs)):
            print('%-22s %8.2f s %14.2f s %18s %12s %12s' % (
                label, run['seconds'], run['longest'], mb(run['peak']), mb(run['maxrss']),
                mb(run['temp_bytes'])))
        print('prune_versions: %d versions across %d messages in %d batches'
              % (ours['deleted'], ours['messages'], ours['batches']))
        print('one DELETE: %d versions' % theirs['deleted'])
        print('ratio prune / one DELETE: time %.2fx, longest transaction %.3fx, Python peak %.2fx, '
              'child RSS %.2fx' % (ours['seconds'] / theirs['seconds'], ours['longest'] / theirs['longest'],
                                   ours['peak'] / max(theirs['peak'], 1), ours['maxrss'] / theirs['maxrss']))
        print('same rows left in both copies: %s' % ('yes' if same else 'NO'))
        if not same or ours['deleted'] != theirs['deleted']:
            sys.exit(1)
    finally:
        for name in (baseline, pruned):
            admin('DROP DATABASE IF EXISTS %s WITH (FORCE)' % name)


if __name__ == '__main__':
    main()
