"""Beside today's WhiteNote on SQLite (caae1ff): the app's own file, shared; its times as
Prisma's SQLite adapter writes them; what its in-process queue lost, done once; the briefing
it dropped, opt-in.  The web app's side is its migration's DDL, and where Node is present
its own data layer, Prisma Client 7 with @prisma/adapter-better-sqlite3 (webapp_prisma.cjs).
"""
import datetime
import os
import re
import sqlite3
import threading
import time
from zoneinfo import ZoneInfo

import pytest
from fake_model import tags
from fake_model import text
from services import TODAY_SQL
from services import Consumer
from services import WebAppPrisma
from services import cli
from services import drain
from services import job_state
from services import tag_names
from services import wait_for

import models
import whitenote_huey
from models import Message

pytestmark = pytest.mark.usefixtures('redis_queue')

SHANGHAI = ZoneInfo('Asia/Shanghai')
DAY = datetime.date(2026, 12, 1)
# Prisma's adapter's text: what the web app writes, and what the worker writes into its tables.
APP_TIME = re.compile(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00')


# The web app's rows, as it writes them (its times in its own form).

def row(table: str, **columns) -> None:
    models.database.execute_sql(models.sql('INSERT INTO "%s" (%s) VALUES (%s)' % (
        table, ', '.join('"%s"' % name for name in columns), models.placeholders(len(columns)))),
        list(columns.values()))


def stamp(when: datetime.datetime | None = None) -> str:
    return models.app_time(when or models.utcnow())


def app_user(**config) -> str:
    """A user, and with ``config`` ("openaiApiKey": ...) an AiConfig row; the user's id."""
    user_id = models.new_id()
    row('User', id=user_id, email='%s@example.org' % user_id, passwordHash='x', createdAt=stamp(),
        updatedAt=stamp())
    if config:
        row('AiConfig', id=models.new_id(), userId=user_id, updatedAt=stamp(), **config)
    return user_id


def app_workspace(user_id: str, name: str = 'Notes', default: bool = True, auto_tag: bool = True,
                  dataset: str | None = None) -> str:
    workspace_id = models.new_id()
    row('Workspace', id=workspace_id, name=name, isDefault=default, enableAutoTag=auto_tag,
        ragflowDatasetId=dataset, userId=user_id, createdAt=stamp(), updatedAt=stamp())
    return workspace_id


def app_note(user_id: str | None, workspace_id: str, content: str, created=None, names=()) -> str:
    """A note as the web app makes it; ``created`` a datetime, or a value as a row may hold it;
    ``names`` tags linked as the app links them (lower-cased)."""
    message_id = models.new_id()
    created = stamp(created) if created is None or isinstance(created, datetime.datetime) else created
    row('Message', id=message_id, content=content, createdAt=created, updatedAt=created, isStarred=False,
        isPinned=False, authorId=user_id, workspaceId=workspace_id)
    for name in names:
        models.database.execute_sql('INSERT OR IGNORE INTO "Tag" ("id", "name", "createdAt") VALUES (?, ?, ?)',
                                    (models.new_id(), name.lower(), stamp()))
        tag_id, = models.database.execute_sql('SELECT "id" FROM "Tag" WHERE "name" = ?', (name.lower(),)).fetchone()
        row('MessageTag', messageId=message_id, tagId=tag_id)
    return message_id


def sqlite_master(path) -> list[tuple]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute('SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name').fetchall()
    finally:
        connection.close()


def migration_master(tmp_path) -> list[tuple]:
    """sqlite_master of a file made by the web app's migration alone."""
    path = tmp_path / 'reference.db'
    connection = sqlite3.connect(path)
    connection.executescript(open(TODAY_SQL).read())
    connection.close()
    return sqlite_master(path)


def local(day: datetime.date, *clock: int, zone: ZoneInfo = SHANGHAI) -> datetime.datetime:
    """The naive UTC of a local wall time."""
    return datetime.datetime.combine(day, datetime.time(*clock), zone).astimezone(datetime.UTC).replace(tzinfo=None)


@pytest.fixture
def shanghai(use):
    use(timezone=SHANGHAI)


# 1. On the app's own file.

def test_the_apps_env_names_its_file_and_the_worker_keeps_to_files_of_its_own(tmp_path):
    app = tmp_path / 'whitenote'
    (app / 'data').mkdir(parents=True)
    connection = sqlite3.connect(app / 'data' / 'whitenote.db')
    connection.executescript(open(TODAY_SQL).read())
    connection.close()
    (app / '.env').write_text('DATABASE_URL="file:./data/whitenote.db"\nAUTH_SECRET="the-apps-secret"\n')
    env = {'WHITENOTE_ENV_FILE': str(app / '.env'), 'WHITENOTE_SECRET': os.environ['WHITENOTE_SECRET'],
           'DATABASE_URL': None}  # the app's .env names the database
    status = cli(env, str(app), 'status')  # run in the app's folder, as its relative URL says
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[-1].startswith('beside WhiteNote: today, ')
    assert 'briefings: off (WHITENOTE_BRIEFINGS=on makes them)' in status.stdout
    assert cli(env, str(app), 'init-db').returncode == 0
    assert cli(env, str(app), 'sweep').returncode == 0
    files = sorted(name for name in os.listdir(app / 'data') if not name.endswith('-journal'))
    assert files == ['whitenote-huey.db', 'whitenote-queue.db', 'whitenote.db']
    assert sqlite_master(app / 'data' / 'whitenote.db') == migration_master(tmp_path)
    connection = sqlite3.connect(app / 'data' / 'whitenote.db')
    assert connection.execute('PRAGMA journal_mode').fetchone() == ('delete',)
    connection.close()
    refused = cli(env, str(app), 'briefing')
    assert refused.returncode == 1 and 'WHITENOTE_BRIEFINGS=on' in refused.stderr


def test_settings_of_the_briefing_are_read_and_checked():
    load = whitenote_huey.load_settings
    assert (load({}).briefings, load({}).briefing_time) == ('', '08:00')
    assert (load({'WHITENOTE_BRIEFINGS': 'ON'}).briefings, load({'BRIEFING_TIME': '7:05'}).briefing_time) \
        == ('on', '07:05')
    for name, bad in (('WHITENOTE_BRIEFINGS', 'yes please'), ('BRIEFING_TIME', '24:00'), ('BRIEFING_TIME', '8')):
        with pytest.raises(whitenote_huey.SettingsError, match=name):
            load({name: bad})


# 2. Dates as the app writes them.

def test_times_are_read_in_every_form_a_row_holds():
    when = datetime.datetime(2026, 12, 2, 5, 1, 41, 383000)
    for value in ('2026-12-02T05:01:41.383+00:00', '2026-12-02 05:01:41.383', '2026-12-02 05:01:41.383000',
                  '2026-12-02T13:01:41.383+08:00', '2026-12-02T05:01:41.383Z', 1764651701383 + 365 * 86400000):
        assert models.parse_time(value) == when, value
    assert models.parse_time('2026-12-02 05:01:41') == when.replace(microsecond=0)
    with pytest.raises(ValueError, match='not a time'):
        models.parse_time('yesterday')


def test_ranges_select_exactly_the_rows_they_mean_whatever_form_a_row_holds(today, model, use, shanghai, tmp_path):
    """The local day of Shanghai, DAY, is [DAY-1 16:00, DAY 16:00) in UTC; as text,
    '2026-11-30T15:00...' >= '2026-11-30 16:00:00' holds, and text compares as text."""
    use(briefings='on')
    user = app_user(openaiBaseUrl=model.url, openaiApiKey=model.api_key, openaiModel='own-model')
    work = app_workspace(user, 'Work')
    before = DAY - datetime.timedelta(days=1)
    rows = {  # createdAt as a row may hold it: inside the day or not
        'prisma, an hour before': ('%sT15:00:00.000+00:00' % before, False),
        'prisma, last ms before': ('%sT15:59:59.999+00:00' % before, False),
        'prisma, first ms': ('%sT16:00:00.000+00:00' % before, True),
        'sqlite text, within': ('%s 16:30:00' % before, True),
        'old worker text, before': ('%s 15:30:00.123456' % before, False),
        'epoch ms, within': (int((local(DAY, 1) - datetime.datetime(1970, 1, 1)).total_seconds() * 1000), True),
        'offset, before': ('%sT23:30:00.000+08:00' % before, False),
        'offset, within': ('%sT00:30:00.000+08:00' % DAY, True),
        'prisma, last ms': ('%sT15:59:59.999+00:00' % DAY, True),
        'prisma, next day': ('%sT16:00:00.000+00:00' % DAY, False),
        'sqlite text, next day': ('%s 16:00:00' % DAY, False),
    }
    ids = {name: app_note(user, work, 'note: %s' % name, created) for name, (created, _) in rows.items()}
    inside = {ids[name] for name, (_, within) in rows.items() if within}
    start, end = whitenote_huey.local_day_bounds(DAY)
    workspace = models.workspace(work)
    day = models.workspace_day(workspace, 'no such title\n', whitenote_huey.BRIEFING_TITLE, start, end)
    assert {message.id for message in day} == inside
    assert [message.created_at for message in day] == sorted(message.created_at for message in day)

    # The briefing of that day: those notes, oldest first, in the prompt, by the user's own model.
    model.default = text('## 📝 昨日回顾\n读了书。')
    assert whitenote_huey.workspace_briefing.call_local(work, DAY, manual=True) == 'done'
    [request] = model.chat_requests()
    assert request.json['model'] == 'own-model'
    assert [name for name in rows if 'note: %s\n' % name in request.prompt + '\n'] == \
        [name for name in rows if rows[name][1]]

    # The sweep's look-back and grace: notes of [now - look-back, now - grace).
    use(sweep_lookback=3600.0, sweep_grace=600.0, briefings='off')
    now = local(DAY, 12)
    swept = {name: app_note(user, work, 'swept: %s' % name, created) for name, created in (
        ('too old', models.app_time(now - datetime.timedelta(seconds=3601))),
        ('oldest', (now - datetime.timedelta(seconds=3600)).isoformat(' ')),
        ('in the look-back', int((now - datetime.timedelta(seconds=1800) - datetime.datetime(1970, 1, 1))
                                 .total_seconds() * 1000)),
        ('last of it', models.app_time(now - datetime.timedelta(seconds=600, milliseconds=1))),
        ('in the grace', models.app_time(now - datetime.timedelta(seconds=600))))}
    recent = whitenote_huey.Sweep(now, budget=100)
    recent.recent_messages()  # the pass's step that looks back (the rolling scan finds older ones)
    queued = {name for name, message_id in swept.items() if job_state('auto-tag', message_id)}
    assert queued == {'oldest', 'in the look-back', 'last of it'} and recent.counts['recent'] == 3

    # The look-back is a range of the index on "createdAt".
    query = (Message
             .select(Message.id)
             .where(models.time_range(Message.created_at, now - datetime.timedelta(hours=1), now)))
    text_sql, params = query.sql()
    plan = ' '.join(str(step) for step in models.database.execute_sql('EXPLAIN QUERY PLAN ' + text_sql, params))
    assert 'Message_createdAt_idx' in plan

    # retag --since: from the local midnight of DAY on, whatever the form.
    env = {'DATABASE_URL': today.url, 'WHITENOTE_SECRET': os.environ['WHITENOTE_SECRET'],
           'WHITENOTE_TIMEZONE': 'Asia/Shanghai'}
    result = cli(env, str(tmp_path), 'retag', '--since', DAY.isoformat())
    assert result.returncode == 0, result.stderr
    retagged = {state.message_id for state in models.JobState.select().where(
        models.JobState.detail == 'retag requested')}
    later = {ids[name] for name in ('prisma, first ms', 'sqlite text, within', 'epoch ms, within', 'offset, within',
                                    'prisma, last ms', 'prisma, next day', 'sqlite text, next day')}
    assert retagged == later | set(swept.values())


def test_what_the_worker_writes_in_the_apps_tables_is_in_the_apps_form(today, use):
    use(briefings='on')
    user = app_user()
    work = app_workspace(user)
    note = app_note(user, work, 'a note #offline', local(DAY, 10))
    whitenote_huey.auto_tag.call_local(user, note)
    assert tag_names(note) == ['offline']
    assert whitenote_huey.workspace_briefing.call_local(work, DAY, manual=True) == 'done'
    for table, column in (('Tag', 'createdAt'), ('Message', 'createdAt'), ('Message', 'updatedAt')):
        values = [value for value, in models.database.execute_sql('SELECT "%s" FROM "%s"' % (column, table))]
        assert values and all(APP_TIME.fullmatch(value) for value in values), (table, values)


# 3. What the app's queue lost.

def test_only_notes_the_app_left_untagged_go_to_the_model(today, model):
    user = app_user(openaiBaseUrl=model.url, openaiApiKey=model.api_key)
    work = app_workspace(user, 'Work')
    quiet = app_workspace(user, 'Quiet', default=False, auto_tag=False)
    lost = app_note(user, work, 'the queue lost this one')
    tagged = app_note(user, work, 'the app tagged this one', names=['reading'])
    off = app_note(user, quiet, 'auto-tag is off here')
    model.default = tags('model', 'tags')
    assert whitenote_huey.sweep(now=models.utcnow() + datetime.timedelta(seconds=119))['enqueued'] == 0  # grace
    whitenote_huey.sweep(now=models.utcnow() + datetime.timedelta(seconds=121))
    drain(whitenote_huey.huey)
    assert tag_names(lost) == ['model', 'tags'] and tag_names(tagged) == ['reading'] and tag_names(off) == []
    assert [r for r in model.chat_requests() if 'the app tagged' in r.prompt] == []
    assert len(model.chat_requests()) == 1
    # A direct job for the app's note (a retag, a job from elsewhere) does not ask the model either.
    whitenote_huey.auto_tag.call_local(user, tagged)
    assert job_state('auto-tag', tagged).status == 'skipped' and len(model.chat_requests()) == 1

    # An edit of a note the worker tagged is tagged again, as before; the app's stays the app's.
    models.database.execute_sql('UPDATE "Message" SET "content" = ? WHERE "id" = ?',
                                ('edited: now about cooking', lost))
    models.database.execute_sql('UPDATE "Message" SET "content" = ? WHERE "id" = ?', ('edited too', tagged))
    model.default = tags('cooking')
    whitenote_huey.auto_tag.call_local(user, lost)
    whitenote_huey.auto_tag.call_local(user, tagged)
    assert tag_names(lost) == ['cooking'] and tag_names(tagged) == ['reading']


def test_tags_the_app_writes_while_the_model_answers_stand_alone(today, model):
    user = app_user(openaiBaseUrl=model.url, openaiApiKey=model.api_key)
    note = app_note(user, app_workspace(user), 'tagged by both at once?')
    path = models.database.database

    def the_app_tags_meanwhile(request):
        connection = sqlite3.connect(path, timeout=30)
        connection.execute('INSERT INTO "Tag" ("id", "name", "createdAt") VALUES (?, ?, ?)',
                           (models.new_id(), 'apps', stamp()))
        connection.execute('INSERT INTO "MessageTag" ("messageId", "tagId") SELECT ?, "id" FROM "Tag" '
                           'WHERE "name" = ?', (note, 'apps'))
        connection.commit()
        connection.close()
        return tags('workers')
    model.default = the_app_tags_meanwhile
    whitenote_huey.auto_tag.call_local(user, note)
    assert tag_names(note) == ['apps']
    assert job_state('auto-tag', note).status == 'skipped'


def test_what_the_app_uploaded_and_is_current_stays_and_the_rest_is_synced(today, ragflow):
    key = 'ragflow-key-today'
    dataset = ragflow.add_dataset(key)
    user = app_user(ragflowBaseUrl=ragflow.url, ragflowApiKey=key)
    work = app_workspace(user, dataset=dataset)
    current = app_note(user, work, 'uploaded by the app @GoldieRill ', names=['Reading', 'art'])
    stale = app_note(user, work, 'edited since the app uploaded it', names=['art'])
    missing = app_note(user, work, 'never uploaded')
    apps = ragflow.add_document(dataset, 'message_%s.md' % current, '#art #reading\n\nuploaded by the app')
    ragflow.add_document(dataset, 'message_%s.md' % stale, '#art\n\nas it was before the edit')
    whitenote_huey.sweep(now=models.utcnow() + datetime.timedelta(minutes=5))
    drain(whitenote_huey.huey)
    docs = {doc['name']: doc for doc in ragflow.documents(dataset)}
    assert sorted(docs) == sorted('message_%s.md' % note for note in (current, stale, missing))
    assert docs['message_%s.md' % current]['id'] == apps['id']  # kept: not uploaded again
    assert job_state('sync-ragflow', current).document_id == apps['id']
    uploads = [request for request in ragflow.requests if request.files]
    assert len(uploads) == 2 and all(current not in request.files[0][0] for request in uploads)
    assert ragflow.count('GET', apps['id']) == 1  # downloaded once, to compare
    assert docs['message_%s.md' % stale]['content'] == '#art\n\nedited since the app uploaded it'

    # A deleted note is followed: its document goes.
    models.database.execute_sql('DELETE FROM "Message" WHERE "id" = ?', (current,))
    whitenote_huey.sweep()
    drain(whitenote_huey.huey)
    assert 'message_%s.md' % current not in {doc['name'] for doc in ragflow.documents(dataset)}


# 4. The briefing the app dropped.

def test_briefings_are_opt_in_one_per_workspace_with_notes_at_briefing_time(today, model, use, shanghai, tmp_path):
    user = app_user(openaiBaseUrl=model.url, openaiApiKey=model.api_key)
    work = app_workspace(user, 'Work')
    home = app_workspace(user, 'Home', default=False)
    empty = app_workspace(user, 'Empty', default=False)
    app_note(user, work, 'work note', local(DAY, 10))
    app_note(user, home, 'home note', local(DAY, 11))
    app_note(user, home, 'home note of the day after', local(DAY, 23, 59) + datetime.timedelta(minutes=2))
    model.default = text('## 📝 昨日回顾\n读了书。')
    next_day = DAY + datetime.timedelta(days=1)
    assert whitenote_huey.dispatch_briefings(local(next_day, 9)) == []  # off by default here
    use(briefings='on', briefing_time='07:30')
    assert whitenote_huey.dispatch_briefings(local(next_day, 7, 29)) == []
    assert sorted(whitenote_huey.dispatch_briefings(local(next_day, 7, 30))) == sorted([work, home, empty])
    drain(whitenote_huey.huey)
    assert whitenote_huey.dispatch_briefings(local(next_day, 9)) == []  # once per workspace and day
    made = {workspace_id: content for workspace_id, content, author, pinned in models.database.execute_sql(
        'SELECT "workspaceId", "content", "authorId", "isPinned" FROM "Message" WHERE "content" LIKE ?',
        (whitenote_huey.BRIEFING_TITLE + '%',)) if author is None and pinned}
    assert sorted(made) == sorted([work, home])
    assert made[work].startswith('# ☀️ 每日晨报 - Work - 2026/12/1\n\n')
    assert models.WorkspaceBriefing.get(models.WorkspaceBriefing.workspace_id == empty).status == 'empty'

    # briefing --date makes them the same way, once.
    env = {'DATABASE_URL': today.url, 'WHITENOTE_SECRET': os.environ['WHITENOTE_SECRET'],
           'WHITENOTE_TIMEZONE': 'Asia/Shanghai', 'WHITENOTE_BRIEFINGS': 'on'}
    again = cli(env, str(tmp_path), 'briefing', '--date', next_day.isoformat())
    assert again.returncode == 0, again.stderr
    assert dict(re.findall(r'for workspace (\w+): (\w+)', again.stdout)) == {
        work: 'unchanged', home: 'unchanged', empty: 'empty'}  # by hand, an empty day is looked at again
    day_after = cli(env, str(tmp_path), 'briefing', '--date', (next_day + datetime.timedelta(days=1)).isoformat(),
                    '--workspace', home)
    assert day_after.returncode == 0 and ': done (done: ' in day_after.stdout


def test_version_cleanup_ranks_versions_by_time_whatever_form_they_hold(today):
    user = app_user()
    note = app_note(user, app_workspace(user), 'edited many times')
    start = datetime.datetime(2026, 11, 1)
    forms = (models.app_time, lambda when: when.isoformat(' '), lambda when: int(
        (when - datetime.datetime(1970, 1, 1)).total_seconds() * 1000))
    for n in range(60):  # the first is an old worker's text: as text it sorts after the others
        when = start + datetime.timedelta(hours=n)
        row('MessageVersion', id=models.new_id(), content='version %d' % n, messageId=note,
            createdAt=when.isoformat(' ') if n == 0 else forms[n % 3](when))
    assert whitenote_huey.prune_versions(keep=50) == (10, 1)
    kept = [content for content, in models.database.execute_sql('SELECT "content" FROM "MessageVersion"')]
    assert sorted(kept, key=lambda content: int(content.split()[1])) == \
        ['version 0'] + ['version %d' % n for n in range(11, 60)]


# 5. Beside the real thing: a consumer runs while the app writes through Prisma.

def test_beside_the_app_writing_through_prisma_a_consumer_does_what_was_lost(tmp_path, model, ragflow):
    app = tmp_path / 'whitenote'
    (app / 'data').mkdir(parents=True)
    path = app / 'data' / 'whitenote.db'
    connection = sqlite3.connect(path)
    connection.executescript(open(TODAY_SQL).read())
    connection.close()
    webapp = WebAppPrisma(str(path))
    key = 'ragflow-key-prisma'
    dataset = ragflow.add_dataset(key)
    [alice] = webapp.run('setup', {'users': [{
        'email': 'alice@example.org',
        'aiConfig': {'openaiBaseUrl': model.url, 'openaiApiKey': model.api_key, 'openaiModel': 'alices-model',
                     'ragflowBaseUrl': ragflow.url, 'ragflowApiKey': key},
        'workspaces': [{'name': 'Work', 'isDefault': True, 'ragflowDatasetId': dataset},
                       {'name': 'Quiet', 'enableAutoTag': False}]}]})
    work, quiet = alice['workspaces']
    yesterday = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)).replace(tzinfo=None)
    note = {'op': 'note', 'authorId': alice['id'], 'workspaceId': work}
    # Before the worker starts: what the app did, and what its queue lost at a restart.
    before = webapp.run('act', {'ops': [
        dict(note, content='lost before tagging'),
        dict(note, content='tagged and uploaded by the app', tags=['apps']),
        dict(note, content='tagged by the app, its upload lost', tags=['apps']),
        dict(note, workspaceId=quiet, content='in a quiet workspace')]})
    assert before['errors'] == []
    lost, uploaded, unsynced, in_quiet = before['results']
    ragflow.add_document(dataset, 'message_%s.md' % uploaded, '#apps\n\ntagged and uploaded by the app')
    models.database.close()
    sqlite3.connect(path).execute('UPDATE "Message" SET "createdAt" = ? WHERE "id" = ?',
                                  (models.parse_time(yesterday).isoformat(timespec='milliseconds') + '+00:00',
                                   lost)).connection.commit()
    model.default = lambda request: text('## 📝 昨日回顾\n读了书。') if '晨报' in request.prompt \
        else tags('worker', 'tags')
    (app / '.env').write_text('DATABASE_URL="file:./data/whitenote.db"\n')
    env = {'WHITENOTE_ENV_FILE': str(app / '.env'), 'WHITENOTE_SECRET': os.environ['WHITENOTE_SECRET'],
           'DATABASE_URL': None, 'WHITENOTE_BRIEFINGS': 'on', 'BRIEFING_TIME': '00:00', 'WHITENOTE_TIMEZONE': 'UTC',
           'SWEEP_GRACE_SECONDS': '1', 'LOG_LEVEL': 'INFO'}
    consumer = Consumer(env, str(app), '-w', '4', '-k', 'thread', '-d', '0.05', '-m', '0.25').start()
    sweeping = threading.Event()

    def sweep_meanwhile() -> None:  # passes as often as a busy deployment's, while the app writes
        while not sweeping.wait(1.5):
            cli(env, str(app), 'sweep')
    sweeper = threading.Thread(target=sweep_meanwhile)
    try:
        sweeper.start()
        ops = []
        for n in range(24):
            ops.append(dict(note, content='note %d written while the worker runs' % n,
                            tags=['given'] if n % 4 == 0 else []))
        ops += [{'op': 'edit', 'id': unsynced, 'content': 'tagged by the app, then edited'},
                {'op': 'comment', 'messageId': uploaded, 'authorId': alice['id'], 'content': 'a comment'},
                {'op': 'delete', 'id': in_quiet}]
        during = webapp.run('act', {'ops': ops, 'pause': [50, 250]})
        assert during['errors'] == []  # the app never saw "database is locked"
        time.sleep(1)  # SWEEP_GRACE_SECONDS: the last notes are the sweep's now
        sweeping.set()
        sweeper.join()
        assert cli(env, str(app), 'sweep').returncode == 0
        fresh = [message_id for message_id, op in zip(during['results'], ops, strict=True) if op['op'] == 'note']

        def settled() -> bool:
            connection = sqlite3.connect(path)
            connection.execute('ATTACH ? AS w', (str(app / 'data' / 'whitenote-huey.db'),))
            try:
                untagged = connection.execute(
                    'SELECT COUNT(*) FROM "Message" AS m WHERE m."workspaceId" = ? AND m."authorId" IS NOT NULL '
                    'AND NOT EXISTS (SELECT 1 FROM "MessageTag" AS t WHERE t."messageId" = m."id")',
                    (work,)).fetchone()[0]
                open_jobs = connection.execute("SELECT COUNT(*) FROM w.whitenote_huey_job WHERE status IN "
                                               "('pending', 'queued', 'retrying', 'running')").fetchone()[0]
                synced = connection.execute("SELECT COUNT(*) FROM w.whitenote_huey_job WHERE kind = 'sync-ragflow' "
                                            "AND status = 'done'").fetchone()[0]
                briefed = connection.execute("SELECT COUNT(*) FROM w.whitenote_huey_workspace_briefing "
                                             "WHERE status = 'done'").fetchone()[0]
            except sqlite3.OperationalError:
                return False
            finally:
                connection.close()
            return untagged == 0 and open_jobs == 0 and synced >= 3 + len(fresh) and briefed == 1
        wait_for(settled, timeout=180, what='the worker to catch up')
    finally:
        sweeping.set()
        if sweeper.is_alive():
            sweeper.join()
        consumer.stop()
    log = consumer.log()
    assert not re.search(r'Traceback|failed after|will retry', log), log[-3000:]

    # Everything the worker wrote, read back through the app's own data layer.
    seen = webapp.run('read')
    messages = {message['id']: message for message in seen['messages']}
    names = {message_id: sorted(tag['name'] for tag in message['tags']) for message_id, message in messages.items()}
    assert names[lost] == ['tags', 'worker'] and names[uploaded] == ['apps'] and names[unsynced] == ['apps']
    assert all(names[message_id] == (['given'] if n % 4 == 0 else ['tags', 'worker'])
               for n, message_id in enumerate(fresh))
    assert in_quiet not in messages
    asked = [request.json['messages'][-1]['content'] for request in model.chat_requests()]
    tagged_by_the_app = [messages[message_id]['content'] for message_id, tagged in names.items() if tagged in (
        ['apps'], ['given'])]
    assert len(tagged_by_the_app) == 8 and not set(tagged_by_the_app) & set(asked)
    [briefing] = [message for message in seen['messages'] if message['authorId'] is None]
    assert briefing['workspaceId'] == work and briefing['isPinned']
    assert briefing['content'].startswith('# ☀️ 每日晨报 - Work - ')
    [briefed] = [request for request in model.chat_requests() if '晨报' in request.prompt]
    assert 'lost before tagging' in briefed.prompt and briefed.json['model'] == 'alices-model'
    assert [(tag['name'], tag['color']) for tag in briefing['tags']] == [('DailyReview', '#FFD700')]
    made = datetime.datetime.fromisoformat(briefing['createdAt'])
    assert abs(made - datetime.datetime.now(datetime.UTC)) < datetime.timedelta(hours=1)
    assert all(tag['createdAt'] for tag in seen['tags'])
    docs = {doc['name']: doc for doc in ragflow.documents(dataset)}
    wanted = {message_id for message_id, message in messages.items() if message['workspaceId'] == work} \
        | {comment['id'] for comment in seen['comments']}  # the briefing too, as with workspaces
    assert sorted(docs) == sorted('message_%s.md' % message_id for message_id in wanted)
    assert docs['message_%s.md' % unsynced]['content'] == '#apps\n\ntagged by the app, then edited'
    assert [sorted(tag['name'] for tag in comment['tags']) for comment in seen['comments']] == [['tags', 'worker']]
    assert [request for request in ragflow.requests if request.files and uploaded in request.files[0][0]] == []

    # The app's file holds exactly what its migration made, in its journal mode.
    assert sqlite_master(path) == migration_master(tmp_path)
    connection = sqlite3.connect(path)
    assert connection.execute('PRAGMA journal_mode').fetchone() == ('delete',)
    forms = connection.execute('SELECT "createdAt" FROM "Tag" UNION ALL SELECT "createdAt" FROM "Message"').fetchall()
    connection.close()
    assert all(APP_TIME.fullmatch(value) for value, in forms)


def test_a_lock_held_longer_than_sqlite_waits_is_waited_out_not_failed(today, caplog):
    user = app_user()
    note = app_note(user, app_workspace(user), 'tagged once the app lets go #patience')
    holder = sqlite3.connect(models.database.database, isolation_level=None)
    holder.execute('BEGIN EXCLUSIVE')  # the app, writing for longer than SQLITE_BUSY_TIMEOUT
    models.database.close()
    worker = threading.Thread(target=whitenote_huey.auto_tag.call_local, args=(user, note))
    with caplog.at_level('WARNING', logger='huey.whitenote'):
        worker.start()
        wait_for(lambda: 'the database is busy' in caplog.text, timeout=60, what='a refused try')
        holder.execute('COMMIT')
        worker.join(60)
    holder.close()
    state = job_state('auto-tag', note)
    assert (tag_names(note), state.status, state.attempts, state.last_error) == (['patience'], 'done', 1, None)


def test_the_unknown_is_still_refused_with_a_prisma_url(tmp_path):
    (tmp_path / 'data').mkdir()
    connection = sqlite3.connect(tmp_path / 'data' / 'whitenote.db')
    connection.executescript(''.join(line for line in open(TODAY_SQL) if '"ragflowDatasetId"' not in line))
    connection.close()
    env = {'DATABASE_URL': 'file:./data/whitenote.db', 'WHITENOTE_SECRET': os.environ['WHITENOTE_SECRET']}
    status = cli(env, str(tmp_path), 'status')
    assert status.returncode == 1 and 'nearest is today' in status.stderr
    assert 'Workspace.ragflowDatasetId' in status.stderr
