"""The sweep at scale: what a pass that finds nothing to do costs, on PostgreSQL.

    python bench/sweep.py [--messages 1000000] [--users 1000] [--passes 7]

Builds the web app's tables in a fresh database: USERS users, each with auto-tag on
and a RAGFlow dataset of their own; MESSAGES messages, one every 90 seconds back from
now (so the last day holds 960 of them), with cuid-like ids; a version row for every
fifth message, an hour after it; and for every message an auto-tag and a sync-ragflow
state that are done for its current content (hashed in SQL as the worker hashes).
So there is nothing to do.  Then it runs one sweep pass to warm the caches and PASSES
more, in this process with the embedded queue, checks that none enqueued anything,
and prints their median time, and for one pass each statement's rows read and
buffers (EXPLAIN (ANALYZE, BUFFERS) of the statements the pass ran, logged by
Peewee), against one full read of the messages, which the sweep never does.  Drops
the database at the end.  The server is TEST_DATABASE_URL's (default
postgresql://postgres@127.0.0.1:5432/test).
"""
import argparse
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
import time
from urllib.parse import urlparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, ROOT)

from services import DATABASE_URL as SERVER_URL  # noqa: E402
from services import SCHEMA_SQL  # noqa: E402
from services import _admin as admin  # noqa: E402

BASE36 = '''
CREATE FUNCTION b36(n bigint, width int) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT string_agg(substr('0123456789abcdefghijklmnopqrstuvwxyz',
                             mod(div(n, power(36::numeric, width - i)), 36)::int + 1, 1), '' ORDER BY i)
    FROM generate_series(1, width) AS i $$;
CREATE FUNCTION cuid_at(at timestamp, n bigint) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT 'c' || b36(floor(extract(epoch FROM at) * 1000)::bigint, 8) || b36(mod(n, 1679616), 4)
           || 'bnch' || substr(md5(n::text), 1, 8) $$;
'''


def database_url(name: str) -> str:
    return urlparse(SERVER_URL)._replace(path='/' + name).geturl()


def build(database, messages: int, users: int) -> None:
    """The data, bulk loaded with generate_series; every job done for the current content."""
    from models import utcnow
    now = utcnow()
    sql = database.execute_sql
    with database.atomic():
        sql(open(SCHEMA_SQL).read())
        sql(BASE36)
        import models
        models.create_tables()
        sql('''INSERT INTO "User" (id, email, "passwordHash", "updatedAt")
               SELECT 'u' || n, 'u' || n || '@example.org', 'x', %s FROM generate_series(0, %s - 1) n''',
            (now, users))
        sql('''INSERT INTO "AiConfig" (id, "userId", "ragflowApiKey", "ragflowDatasetId", "updatedAt")
               SELECT 'a' || n, 'u' || n, 'key-' || n, 'dataset-' || n, %s
               FROM generate_series(0, %s - 1) n''', (now, users))
        sql('''INSERT INTO "Message" (id, content, "createdAt", "updatedAt", "authorId")
               SELECT cuid_at(at, g), 'bench note ' || g || ' ' || repeat(md5(g::text), 6), at, at,
                      'u' || (g %% %s)
               FROM (SELECT g, %s::timestamp - (%s - g) * interval '90 seconds' AS at
                     FROM generate_series(1, %s) g) AS s''', (users, now, messages, messages))
        sql('''INSERT INTO "MessageVersion" (id, content, "createdAt", "messageId")
               SELECT cuid_at("createdAt" + interval '1 hour', hashtext(id)), 'earlier text',
                      "createdAt" + interval '1 hour', id
               FROM "Message" WHERE hashtext(id) %% 5 = 0 AND "createdAt" < %s - interval '1 hour' ''',
            (now,))
        sql('INSERT INTO ' + models.JOB_TABLE + ''' (kind, message_id, user_id, status, content_hash,
                                               attempts, tags_added, created_at, updated_at)
               SELECT 'auto-tag', id, "authorId", 'done',
                      encode(sha256(convert_to(content, 'UTF8') || '\\x00'::bytea), 'hex'),
                      1, '[]', %s, %s
               FROM "Message"''', (now, now))
        sql('INSERT INTO ' + models.JOB_TABLE + ''' (kind, message_id, user_id, status, content_hash,
                                               attempts, tags_added, document_id, dataset_id,
                                               created_at, updated_at)
               SELECT 'sync-ragflow', m.id, m."authorId", 'done',
                      encode(sha256(convert_to(m.content, 'UTF8') || '\\x00'::bytea
                                    || convert_to(c."ragflowDatasetId", 'UTF8') || '\\x00'::bytea), 'hex'),
                      1, '[]', md5(m.id), c."ragflowDatasetId", %s, %s
               FROM "Message" m JOIN "AiConfig" c ON c."userId" = m."authorId"''', (now, now))
    database.execute_sql('VACUUM ANALYZE')


class Statements(logging.Handler):
    """Collects the (sql, params) Peewee logs for each statement it runs."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seen = []

    def emit(self, record):
        if isinstance(record.msg, tuple):
            self.seen.append(record.msg)


def explain(database, statement: tuple) -> dict:
    """Rows the scans read (returned and filtered out), buffers, and time of one SELECT."""
    sql, params = statement
    plan = database.execute_sql('EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ' + sql, params).fetchone()[0]
    top = plan[0]['Plan']
    rows, nodes = 0, [top]
    while nodes:
        node = nodes.pop()
        if 'Scan' in node['Node Type']:
            rows += (node['Actual Rows'] + node.get('Rows Removed by Filter', 0)) * node['Actual Loops']
        nodes += node.get('Plans', [])
    return dict(rows=rows, buffers=top['Shared Hit Blocks'] + top['Shared Read Blocks'],
                ms=plan[0]['Execution Time'], sql=' '.join(sql.split())[:90])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--messages', type=int, default=1_000_000)
    parser.add_argument('--users', type=int, default=1000)
    parser.add_argument('--passes', type=int, default=7)
    args = parser.parse_args()
    name = 'whitenote_bench_sweep_%d' % os.getpid()
    scratch = tempfile.mkdtemp(prefix='whitenote-bench-')
    os.chdir(scratch)  # the embedded queue's file goes here
    os.environ.update(DATABASE_URL=database_url(name), WHITENOTE_SECRET='bench', LOG_LEVEL='WARNING')
    os.environ.pop('REDIS_URL', None)
    admin('CREATE DATABASE %s' % name)
    try:
        import whitenote_huey
        from models import database
        started = time.perf_counter()
        with database.connection_context():
            build(database, args.messages, args.users)
        print('built %d messages over %d users, each with 2 done jobs, in %.0f s'
              % (args.messages, args.users, time.perf_counter() - started))
        times, statements, settings = [], Statements(), whitenote_huey.settings
        with database.connection_context():
            for n in range(args.passes + 1):
                peewee_log = logging.getLogger('peewee')
                if n == 1:
                    peewee_log.addHandler(statements)
                    peewee_log.setLevel(logging.DEBUG)
                began = time.perf_counter()
                counts = whitenote_huey.sweep()
                elapsed = time.perf_counter() - began
                peewee_log.removeHandler(statements)
                if counts['enqueued']:
                    sys.exit('a pass enqueued %d job(s): the data is not all done' % counts['enqueued'])
                if n:
                    times.append(elapsed)
            plans = [explain(database, s) for s in statements.seen if s[0].lstrip().startswith('SELECT')]
            full = explain(database, ('SELECT "id", "authorId", "content" FROM "Message"', ()))
            wide = min(args.messages, 100_000)  # what reading every message each pass would cost
            whitenote_huey.settings = dataclasses.replace(whitenote_huey.settings, sweep_scan_batch=wide)
            began = time.perf_counter()
            whitenote_huey.sweep()
            wide_seconds = time.perf_counter() - began
            whitenote_huey.settings = settings
        print('idle sweep pass: median %.1f ms over %d passes (min %.1f, max %.1f); each '
              'scans %d of the messages and %d sync rows, and the %d created in the last %g h'
              % (statistics.median(times) * 1000, len(times), min(times) * 1000, max(times) * 1000,
                 counts['messages_scanned'], counts['documents_scanned'],
                 min(args.messages, int(settings.sweep_lookback // 90)), settings.sweep_lookback / 3600))
        print('%8s %9s %9s  %s' % ('rows', 'buffers', 'ms', 'statement of one pass'))
        for plan in plans:
            print('%8d %9d %9.1f  %s' % (plan['rows'], plan['buffers'], plan['ms'], plan['sql']))
        print('%8d %9d %9.1f  total of one pass' % (sum(p['rows'] for p in plans),
                                                    sum(p['buffers'] for p in plans),
                                                    sum(p['ms'] for p in plans)))
        print('%8d %9d %9.1f  one full read of the messages, for comparison'
              % (full['rows'], full['buffers'], full['ms']))
        print('a pass scanning %d messages (SWEEP_SCAN_BATCH=%d) took %.1f s: one reading all %d '
              'messages would take about %.0f s, every minute' % (
                  wide, wide, wide_seconds, args.messages, wide_seconds * args.messages / wide))
        cycle = -(-args.messages // settings.sweep_scan_batch) * settings.sweep_minutes
        print('the rolling scan covers all %d messages once every %d passes: %d minutes at '
              'SWEEP_MINUTES=%d, SWEEP_SCAN_BATCH=%d' % (args.messages, cycle // settings.sweep_minutes,
                                                         cycle, settings.sweep_minutes,
                                                         settings.sweep_scan_batch))
    finally:
        try:
            from models import database
            database.close()
        except Exception:
            pass
        admin('DROP DATABASE IF EXISTS %s WITH (FORCE)' % name)


if __name__ == '__main__':
    main()
