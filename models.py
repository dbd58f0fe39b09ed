"""Peewee models: WhiteNote's tables, mapped exactly, and the worker's own state.

The web app (Prisma on PostgreSQL) owns "User", "AiConfig", "Message", "Tag",
"MessageTag" and "MessageVersion": quoted PascalCase tables, camelCase columns,
text ids, naive UTC timestamps.  The worker reads and writes their rows but never
changes their shape.  Its own state lives out of the web app's sight, in tables named
``whitenote_huey_*`` in a schema of their own, "whitenote_huey": a PostgreSQL schema,
or on SQLite a file beside the app's, attached to each connection under that name.
"""
import datetime
import functools
import json
import os
import secrets
import threading
import time

from peewee import AutoField
from peewee import BooleanField
from peewee import CompositeKey
from peewee import DatabaseProxy
from peewee import DateField
from peewee import DateTimeField
from peewee import ForeignKeyField
from peewee import IntegerField
from peewee import Model
from peewee import PostgresqlDatabase
from peewee import TextField

database = DatabaseProxy()

# Where the worker's own tables live, and their names as hand-written SQL must write
# them (qualified, so that the web app's schema never resolves them).
WORKER_SCHEMA = 'whitenote_huey'
JOB_TABLE = '"whitenote_huey"."whitenote_huey_job"'
BRIEFING_TABLE = '"whitenote_huey"."whitenote_huey_briefing"'
RUN_TABLE = '"whitenote_huey"."whitenote_huey_run"'
SWEEP_TABLE = '"whitenote_huey"."whitenote_huey_sweep"'


def utcnow() -> datetime.datetime:
    """Naive UTC at millisecond precision, as the web app's timestamp(3) holds it."""
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


_BASE36 = '0123456789abcdefghijklmnopqrstuvwxyz'
_id_lock = threading.Lock()
_id_counter = secrets.randbelow(36 ** 4)
_fingerprint = ''.join(_BASE36[b % 36] for b in os.urandom(4))


def _base36(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 36)
        digits.append(_BASE36[digit])
    return ''.join(reversed(digits))


def new_id() -> str:
    """A cuid-like id (25 chars, starts with "c"), of the kind Prisma's cuid() makes."""
    global _id_counter
    with _id_lock:
        _id_counter = (_id_counter + 1) % 36 ** 4
        counter = _id_counter
    return ('c' + _base36(int(time.time() * 1000), 8) + _base36(counter, 4)
            + _fingerprint + ''.join(secrets.choice(_BASE36) for _ in range(8)))


def id_floor(when: datetime.datetime) -> str:
    """A string below every cuid made at or after ``when`` (naive UTC) and above those
    made before: ids of this kind start with their creation time, so a range of the
    primary key is a range of time."""
    millis = int(when.replace(tzinfo=datetime.UTC).timestamp() * 1000)
    return 'c' + _base36(millis, 8)


class BaseModel(Model):
    class Meta:
        database = database


# The statements every job runs are written out in SQL that SQLite and PostgreSQL both
# take: building them with Peewee cost more CPU than running them (some 0.2-0.5 ms a
# statement against 0.05), and a job runs about ten.  The rest of the code uses Peewee.

def sql(text: str) -> str:
    """Hand-written SQL with ``?`` placeholders, in the bound database's own paramstyle."""
    param = database.param
    return text if param == '?' else text.replace('?', param)


def placeholders(count: int) -> str:
    return ', '.join('?' * count)


def like_prefix(text: str) -> str:
    """A LIKE pattern (with ESCAPE '\\') matching what starts with ``text``."""
    return text.replace('\\', '\\\\').replace('%', '\\%').replace('_', '\\_') + '%'


@functools.cache
def upsert_sql(table: str, columns: tuple[str, ...], conflict: tuple[str, ...],
               updated: tuple[str, ...], param: str) -> str:
    """INSERT into ``table`` (a name as SQL writes it) of ``columns`` that, when a row with
    the same ``conflict`` columns exists, sets its ``updated`` columns instead."""
    return 'INSERT INTO %s (%s) VALUES (%s) ON CONFLICT (%s) DO UPDATE SET %s' % (
        table, ', '.join('"%s"' % name for name in columns), ', '.join([param] * len(columns)),
        ', '.join('"%s"' % name for name in conflict),
        ', '.join('"%s" = excluded."%s"' % (name, name) for name in updated))


@functools.cache
def update_sql(table: str, columns: tuple[str, ...], where: tuple[str, ...], param: str) -> str:
    """UPDATE of ``table`` (a name as SQL writes it) setting ``columns`` of the rows whose
    ``where`` columns equal the values given."""
    return 'UPDATE %s SET %s WHERE %s' % (
        table, ', '.join('"%s" = %s' % (name, param) for name in columns),
        ' AND '.join('"%s" = %s' % (name, param) for name in where))


# WhiteNote's tables.

class User(BaseModel):
    id = TextField(primary_key=True, default=new_id)
    email = TextField(unique=True)
    password_hash = TextField(column_name='passwordHash', default='')
    name = TextField(null=True)
    avatar = TextField(null=True)
    created_at = DateTimeField(column_name='createdAt', default=utcnow)
    updated_at = DateTimeField(column_name='updatedAt', default=utcnow)
    email_verified = DateTimeField(column_name='emailVerified', null=True)

    class Meta:
        table_name = 'User'


class AiConfig(BaseModel):
    id = TextField(primary_key=True, default=new_id)
    user = ForeignKeyField(User, column_name='userId', object_id_name='user_id', unique=True, on_delete='CASCADE')
    openai_base_url = TextField(column_name='openaiBaseUrl', default='http://localhost:4000')
    openai_api_key = TextField(column_name='openaiApiKey', default='')
    openai_model = TextField(column_name='openaiModel', default='gpt-3.5-turbo')
    enable_rag = BooleanField(column_name='enableRag', default=False)
    ragflow_base_url = TextField(column_name='ragflowBaseUrl', default='http://localhost:4154')
    ragflow_api_key = TextField(column_name='ragflowApiKey', default='')
    ragflow_chat_id = TextField(column_name='ragflowChatId', default='')
    ragflow_dataset_id = TextField(column_name='ragflowDatasetId', default='')
    rag_time_filter_start = DateTimeField(column_name='ragTimeFilterStart', null=True)
    rag_time_filter_end = DateTimeField(column_name='ragTimeFilterEnd', null=True)
    enable_auto_tag = BooleanField(column_name='enableAutoTag', default=True)
    auto_tag_model = TextField(column_name='autoTagModel', default='gpt-3.5-turbo')
    enable_briefing = BooleanField(column_name='enableBriefing', default=True)
    briefing_model = TextField(column_name='briefingModel', default='gpt-3.5-turbo')
    briefing_time = TextField(column_name='briefingTime', default='08:00')
    ai_personality = TextField(column_name='aiPersonality', default='friendly')
    ai_expertise = TextField(column_name='aiExpertise', null=True)
    enable_link_suggestion = BooleanField(column_name='enableLinkSuggestion', default=True)
    updated_at = DateTimeField(column_name='updatedAt', default=utcnow)

    class Meta:
        table_name = 'AiConfig'

    @classmethod
    def for_user(cls, user_id: str) -> 'AiConfig':
        """The user's settings, or the web app's defaults when the user has no row."""
        for config in cls.raw(sql('SELECT * FROM "AiConfig" WHERE "userId" = ?'), user_id):
            return config
        return cls(user=user_id)

    @classmethod
    def for_existing_user(cls, user_id: str) -> 'AiConfig | None':
        """for_user(), and in the same query whether the user exists: None if not."""
        for config in cls.raw(sql('SELECT "AiConfig".* FROM "User" '
                                  'LEFT JOIN "AiConfig" ON "AiConfig"."userId" = "User"."id" '
                                  'WHERE "User"."id" = ?'), user_id):
            return config if config.id is not None else cls(user=user_id)
        return None


class Message(BaseModel):
    id = TextField(primary_key=True, default=new_id)
    title = TextField(null=True)
    content = TextField()
    created_at = DateTimeField(column_name='createdAt', default=utcnow)
    updated_at = DateTimeField(column_name='updatedAt', default=utcnow)
    is_starred = BooleanField(column_name='isStarred', default=False)
    is_pinned = BooleanField(column_name='isPinned', default=False)
    author = ForeignKeyField(User, column_name='authorId', object_id_name='author_id',
                             on_delete='CASCADE')
    parent = ForeignKeyField('self', column_name='parentId', object_id_name='parent_id', null=True,
                             on_delete='SET NULL')

    class Meta:
        table_name = 'Message'

    @classmethod
    def add(cls, message_id: str, author_id: str, content: str, pinned: bool,
            now: datetime.datetime) -> None:
        """Insert a message the worker writes (a briefing), as the web app would."""
        database.execute_sql(sql(
            'INSERT INTO "Message" ("id", "content", "createdAt", "updatedAt", "isStarred", '
            '"isPinned", "authorId") VALUES (?, ?, ?, ?, ?, ?, ?)'),
            (message_id, content, now, now, False, pinned, author_id))

    @classmethod
    def content_of(cls, message_id: str) -> 'Message | None':
        """The message's id, author and content, what a job reads; None once it is gone."""
        for message in cls.raw(sql('SELECT "id", "authorId", "content" FROM "Message" '
                                   'WHERE "id" = ?'), message_id):
            return message
        return None


class Tag(BaseModel):
    id = TextField(primary_key=True, default=new_id)
    name = TextField(unique=True)
    color = TextField(null=True)
    created_at = DateTimeField(column_name='createdAt', default=utcnow)

    class Meta:
        table_name = 'Tag'

    @classmethod
    def upsert(cls, name: str, color: str | None = None) -> 'Tag':
        """The tag of that name (ignoring case), created if missing; safe under races.

        ``color`` is given to a new tag, and to an existing one only if it has none:
        a colour the user chose stays.
        """
        tag = cls.upsert_all([name], color)[0]
        if color and not tag.color:
            (cls
             .update(color=color)
             .where((cls.id == tag.id) & (cls.color.is_null() | (cls.color == '')))
             .execute())
            tag = cls.get_by_id(tag.id)
        return tag

    @classmethod
    def upsert_all(cls, names: list[str], color: str | None = None) -> list['Tag']:
        """The tags of these names (ignoring case; the oldest of several), in order,
        created if missing: one query when all exist; safe under races."""
        if not names:
            return []
        folded = [name.lower() for name in names]

        def existing() -> dict[str, 'Tag']:
            found: dict[str, Tag] = {}
            for tag in cls.raw(sql('SELECT * FROM "Tag" WHERE LOWER("name") IN (%s) '
                                   'ORDER BY "createdAt", "id"' % placeholders(len(folded))),
                               *folded):
                found.setdefault(tag.name.lower(), tag)
            return found

        found = existing()
        missing = {fold: name for fold, name in zip(folded, names, strict=True) if fold not in found}
        if missing:
            (cls
             .insert_many([{'id': new_id(), 'name': name, 'color': color}
                           for name in missing.values()])
             .on_conflict_ignore()
             .execute())
            found = existing()
        return [found.get(fold) or cls.get(cls.name == name) for fold, name in zip(folded, names, strict=True)]

    @classmethod
    def names_used_by(cls, user_id: str, limit: int = 50) -> list[str]:
        """Names of the tags on this user's own messages, most used first."""
        cursor = database.execute_sql(sql(
            'SELECT "Tag"."name" FROM "Tag" '
            'JOIN "MessageTag" ON "MessageTag"."tagId" = "Tag"."id" '
            'JOIN "Message" ON "Message"."id" = "MessageTag"."messageId" '
            'WHERE "Message"."authorId" = ? '
            'GROUP BY "Tag"."id", "Tag"."name" '
            'ORDER BY COUNT("MessageTag"."messageId") DESC, "Tag"."name" '
            'LIMIT ?'), (user_id, limit))
        return [name for name, in cursor.fetchall()]


class MessageTag(BaseModel):
    message = ForeignKeyField(Message, column_name='messageId', object_id_name='message_id',
                              on_delete='CASCADE')
    tag = ForeignKeyField(Tag, column_name='tagId', object_id_name='tag_id', on_delete='CASCADE')

    class Meta:
        table_name = 'MessageTag'
        primary_key = CompositeKey('message', 'tag')

    @classmethod
    def links_of(cls, message_id: str) -> dict[str, str]:
        """The tags on one message: tag id to tag name."""
        cursor = database.execute_sql(sql(
            'SELECT "Tag"."id", "Tag"."name" FROM "MessageTag" '
            'JOIN "Tag" ON "Tag"."id" = "MessageTag"."tagId" '
            'WHERE "MessageTag"."messageId" = ?'), (message_id,))
        return dict(cursor.fetchall())

    @classmethod
    def link(cls, message_id: str, tag_ids: list[str]) -> None:
        """Put these tags on the message; links it has already stay as they are."""
        if tag_ids:
            database.execute_sql(sql(
                'INSERT INTO "MessageTag" ("messageId", "tagId") VALUES %s ON CONFLICT DO NOTHING'
                % ', '.join(['(?, ?)'] * len(tag_ids))),
                [value for tag_id in tag_ids for value in (message_id, tag_id)])


class MessageVersion(BaseModel):
    id = TextField(primary_key=True, default=new_id)
    content = TextField()
    created_at = DateTimeField(column_name='createdAt', default=utcnow)
    message = ForeignKeyField(Message, column_name='messageId', object_id_name='message_id',
                              on_delete='CASCADE')

    class Meta:
        table_name = 'MessageVersion'


WEBAPP_MODELS = (User, Message, Tag, MessageTag, MessageVersion, AiConfig)

# The web app's DDL, run only for a table that does not exist yet (standalone mode),
# so an embedded database has the same tables, defaults and index names.
WEBAPP_DDL = {
    'User': [
        'CREATE TABLE "User" ("id" TEXT PRIMARY KEY, "email" TEXT NOT NULL UNIQUE, '
        '"passwordHash" TEXT NOT NULL, "name" TEXT, "avatar" TEXT, '
        '"createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP, '
        '"updatedAt" TIMESTAMP(3) NOT NULL, "emailVerified" TIMESTAMP(3))',
    ],
    'Message': [
        'CREATE TABLE "Message" ("id" TEXT PRIMARY KEY, "title" TEXT, "content" TEXT NOT NULL, '
        '"createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP, '
        '"updatedAt" TIMESTAMP(3) NOT NULL, "isStarred" BOOLEAN NOT NULL DEFAULT false, '
        '"isPinned" BOOLEAN NOT NULL DEFAULT false, '
        '"authorId" TEXT NOT NULL REFERENCES "User"("id") ON DELETE CASCADE ON UPDATE CASCADE, '
        '"parentId" TEXT REFERENCES "Message"("id") ON DELETE SET NULL ON UPDATE CASCADE)',
        'CREATE INDEX "Message_authorId_idx" ON "Message"("authorId")',
        'CREATE INDEX "Message_createdAt_idx" ON "Message"("createdAt" DESC)',
        'CREATE INDEX "Message_isPinned_createdAt_idx" ON "Message"("isPinned", "createdAt" DESC)',
    ],
    'Tag': [
        'CREATE TABLE "Tag" ("id" TEXT PRIMARY KEY, "name" TEXT NOT NULL UNIQUE, "color" TEXT, '
        '"createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP)',
    ],
    'MessageTag': [
        'CREATE TABLE "MessageTag" ('
        '"messageId" TEXT NOT NULL REFERENCES "Message"("id") ON DELETE CASCADE ON UPDATE CASCADE, '
        '"tagId" TEXT NOT NULL REFERENCES "Tag"("id") ON DELETE CASCADE ON UPDATE CASCADE, '
        'PRIMARY KEY ("messageId", "tagId"))',
        'CREATE INDEX "MessageTag_tagId_idx" ON "MessageTag"("tagId")',
    ],
    'MessageVersion': [
        'CREATE TABLE "MessageVersion" ("id" TEXT PRIMARY KEY, "content" TEXT NOT NULL, '
        '"createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP, '
        '"messageId" TEXT NOT NULL REFERENCES "Message"("id") ON DELETE CASCADE ON UPDATE CASCADE)',
        'CREATE INDEX "MessageVersion_messageId_createdAt_idx" '
        'ON "MessageVersion"("messageId", "createdAt" DESC)',
    ],
    'AiConfig': [
        'CREATE TABLE "AiConfig" ("id" TEXT PRIMARY KEY, '
        '"userId" TEXT NOT NULL UNIQUE REFERENCES "User"("id") ON DELETE CASCADE ON UPDATE CASCADE, '
        '"openaiBaseUrl" TEXT NOT NULL DEFAULT \'http://localhost:4000\', '
        '"openaiApiKey" TEXT NOT NULL DEFAULT \'\', '
        '"openaiModel" TEXT NOT NULL DEFAULT \'gpt-3.5-turbo\', '
        '"enableRag" BOOLEAN NOT NULL DEFAULT false, '
        '"ragflowBaseUrl" TEXT NOT NULL DEFAULT \'http://localhost:4154\', '
        '"ragflowApiKey" TEXT NOT NULL DEFAULT \'\', '
        '"ragflowChatId" TEXT NOT NULL DEFAULT \'\', '
        '"ragflowDatasetId" TEXT NOT NULL DEFAULT \'\', '
        '"ragTimeFilterStart" TIMESTAMP(3), "ragTimeFilterEnd" TIMESTAMP(3), '
        '"enableAutoTag" BOOLEAN NOT NULL DEFAULT true, '
        '"autoTagModel" TEXT NOT NULL DEFAULT \'gpt-3.5-turbo\', '
        '"enableBriefing" BOOLEAN NOT NULL DEFAULT true, '
        '"briefingModel" TEXT NOT NULL DEFAULT \'gpt-3.5-turbo\', '
        '"briefingTime" TEXT NOT NULL DEFAULT \'08:00\', '
        '"aiPersonality" TEXT NOT NULL DEFAULT \'friendly\', "aiExpertise" TEXT, '
        '"enableLinkSuggestion" BOOLEAN NOT NULL DEFAULT true, '
        '"updatedAt" TIMESTAMP(3) NOT NULL)',
    ],
}


# The worker's own tables.

class JobState(BaseModel):
    """What the worker last did for one message and job kind.

    The queue may lose a job; this row is the record the sweep reconciles from.
    ``content_hash`` names the input the outcome belongs to, so a changed message
    is seen as work to do again.  ``status`` is an outcome (done, skipped, failed) or
    a run due or under way: pending, queued (enqueued by the sweep), retrying,
    running.  For those, ``lease_until`` is when the run is taken to be lost: a
    running job's lease, renewed while its worker lives, the time its retry is due,
    or how long a queued job may wait.
    """
    kind = TextField()
    message_id = TextField()
    user_id = TextField()
    status = TextField(default='pending', index=True)
    content_hash = TextField(null=True)
    attempts = IntegerField(default=0)
    last_error = TextField(null=True)
    detail = TextField(null=True)
    tags_added = TextField(default='[]')
    document_id = TextField(null=True)
    dataset_id = TextField(null=True)
    lease_until = DateTimeField(null=True)
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow, index=True)

    class Meta:
        table_name = 'whitenote_huey_job'
        schema = WORKER_SCHEMA
        indexes = ((('kind', 'message_id'), True),)

    @property
    def added_tag_ids(self) -> list[str]:
        return json.loads(self.tags_added or '[]')

    @classmethod
    def lookup(cls, kind: str, message_id: str, user_id: str) -> 'JobState':
        """The state row for this job, or a new unsaved one: one read, no write."""
        for state in cls.raw(sql('SELECT * FROM %s WHERE "kind" = ? AND "message_id" = ?'
                                 % JOB_TABLE), kind, message_id):
            return state
        return cls(kind=kind, message_id=message_id, user_id=user_id)

    @classmethod
    def claim(cls, kind: str, message_id: str, user_id: str, input_hash: str,
              now: datetime.datetime, lease_until: datetime.datetime, exists: bool) -> bool:
        """Mark the job running for this input unless a live run holds its row (status
        running, lease not yet over); a missing row is made already claimed.  One atomic
        statement, so two workers on one message cannot both proceed.  ``exists``: the
        row was read, so a plain UPDATE does (an upsert takes a number of the id
        sequence on PostgreSQL each time, even when the row is there)."""
        free = ('"job"."status" != \'running\' '
                'OR "job"."lease_until" IS NULL '
                'OR "job"."lease_until" <= ?')
        if exists:
            statement = ('UPDATE %s AS "job" SET "status" = \'running\', "content_hash" = ?, '
                         '"attempts" = "attempts" + 1, "lease_until" = ?, "updated_at" = ? '
                         'WHERE "kind" = ? AND "message_id" = ? AND (%s)' % (JOB_TABLE, free))
            params = (input_hash, lease_until, now, kind, message_id, now)
        else:
            statement = (
                'INSERT INTO %s AS "job" ("kind", "message_id", "user_id", "status", '
                '"content_hash", "attempts", "tags_added", "lease_until", "created_at", "updated_at") '
                "VALUES (?, ?, ?, 'running', ?, 1, '[]', ?, ?, ?) "
                'ON CONFLICT ("kind", "message_id") DO UPDATE SET '
                '"status" = excluded."status", "content_hash" = excluded."content_hash", '
                '"attempts" = "job"."attempts" + 1, '
                '"lease_until" = excluded."lease_until", "updated_at" = excluded."updated_at" '
                'WHERE %s' % (JOB_TABLE, free))
            params = (kind, message_id, user_id, input_hash, lease_until, now, now, now)
        return database.execute_sql(sql(statement), params).rowcount == 1

    @classmethod
    def write(cls, kind: str, message_id: str, user_id: str, exists: bool, **fields) -> int:
        """Set these columns of the job's row (``updated_at`` among them): an UPDATE when
        the row ``exists``, else one statement that makes it if it is still missing.
        Returns the number of rows written."""
        table = JOB_TABLE
        if exists:
            statement = update_sql(table, tuple(fields), ('kind', 'message_id'), database.param)
            return database.execute_sql(statement, (*fields.values(), kind, message_id)).rowcount
        row = {'kind': kind, 'message_id': message_id, 'user_id': user_id, 'status': 'pending',
               'attempts': 0, 'tags_added': '[]', 'created_at': fields['updated_at'], **fields}
        statement = upsert_sql(table, tuple(row), ('kind', 'message_id'), tuple(fields), database.param)
        return database.execute_sql(statement, tuple(row.values())).rowcount


class Briefing(BaseModel):
    """One user's daily briefing for one local day (the day it summarises).

    The unique (user_id, day) row decides who makes the briefing: a run claims it
    (status "running", its token in ``owner``, a lease), asks the model outside any
    transaction, then writes the message and marks the row "done" in one transaction,
    only while it still owns the row.  A claim whose lease ran out can be taken over,
    and the run that lost it can no longer write.
    """
    user_id = TextField()
    day = DateField()
    status = TextField(default='pending', index=True)
    owner = TextField(null=True)
    attempts = IntegerField(default=0)
    message_id = TextField(null=True)
    covered = IntegerField(null=True)
    total = IntegerField(null=True)
    detail = TextField(null=True)
    last_error = TextField(null=True)
    lease_until = DateTimeField(null=True)
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = 'whitenote_huey_briefing'
        schema = WORKER_SCHEMA
        indexes = ((('user_id', 'day'), True),)

    @classmethod
    def lookup(cls, user_id: str, day: datetime.date) -> 'Briefing':
        """The row for this user and day, or a new unsaved one: one read, no write."""
        for row in cls.raw(sql('SELECT * FROM %s WHERE "user_id" = ? AND "day" = ?'
                               % BRIEFING_TABLE), user_id, day):
            return row
        return cls(user_id=user_id, day=day)

    @classmethod
    def claim(cls, user_id: str, day: datetime.date, owner: str, statuses: tuple[str, ...],
              now: datetime.datetime, lease_until: datetime.datetime) -> bool:
        """Take the day for ``owner`` if its row is missing, in one of ``statuses``, or
        running under a lease that ran out.  One atomic statement: of two runs at once,
        one proceeds."""
        cursor = database.execute_sql(sql(
            'INSERT INTO %s AS "briefing" ("user_id", "day", "status", "owner", '
            '"attempts", "lease_until", "created_at", "updated_at") '
            "VALUES (?, ?, 'running', ?, 1, ?, ?, ?) "
            'ON CONFLICT ("user_id", "day") DO UPDATE SET '
            '"status" = excluded."status", "owner" = excluded."owner", '
            '"attempts" = "briefing"."attempts" + 1, '
            '"lease_until" = excluded."lease_until", "updated_at" = excluded."updated_at" '
            'WHERE "briefing"."status" IN (%s) '
            'OR ("briefing"."status" = \'running\' '
            'AND "briefing"."lease_until" < ?)' % (BRIEFING_TABLE, placeholders(len(statuses)))),
            (user_id, day, owner, lease_until, now, now, *statuses, now))
        return cursor.rowcount == 1

    @classmethod
    def write(cls, user_id: str, day: datetime.date, owner: str, **fields) -> int:
        """Set these columns of the day's row while ``owner`` holds it; 0 once it does not."""
        statement = update_sql(BRIEFING_TABLE, tuple(fields), ('user_id', 'day', 'owner'),
                               database.param)
        return database.execute_sql(statement, (*fields.values(), user_id, day, owner)).rowcount


class WorkerRun(BaseModel):
    """The last run of a named periodic activity, such as the sweep or the briefings.

    One row per name, upserted: ``whitenote-huey status`` shows when each last ran.
    """
    name = TextField(primary_key=True)
    started_at = DateTimeField(null=True)
    finished_at = DateTimeField(null=True)
    outcome = TextField(null=True)
    counts = TextField(default='{}')
    detail = TextField(null=True)

    class Meta:
        table_name = 'whitenote_huey_run'
        schema = WORKER_SCHEMA


class SweepCursor(BaseModel):
    """Where one of the sweep's rolling scans goes on from (a key of the scanned table)."""
    name = TextField(primary_key=True)
    position = TextField(default='')
    updated_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = 'whitenote_huey_sweep'
        schema = WORKER_SCHEMA


WORKER_MODELS = (JobState, Briefing, WorkerRun, SweepCursor)


TABLES_LOCK = 0x7768_6e5f_7462  # pg_advisory_xact_lock key: consumers starting together take turns


def create_tables() -> list[str]:
    """Create what is missing: a web-app table only if absent, the worker's own always.
    Returns the names of the tables made.

    On a WhiteNote database this touches nothing of the web app's; on an empty one
    it creates the web app's tables as the web app would have.  The worker's tables go
    in its own schema; those an earlier version left in the web app's schema (or, on
    SQLite, in the app's file) are moved there first, rows and all.  On PostgreSQL one
    creator at a time holds an advisory lock: CREATE ... IF NOT EXISTS run by several
    sessions at once can still collide ("pg_type_typname_nsp_index"); on SQLite the
    transaction's write lock does the same.
    """
    created = []
    postgres = isinstance(database.obj, PostgresqlDatabase)
    with database.atomic():
        app_schema = 'main'  # SQLite: the app's file
        if postgres:
            database.execute_sql('SELECT pg_advisory_xact_lock(%s)', (TABLES_LOCK,))
            if not database.execute_sql('SELECT 1 FROM pg_namespace WHERE nspname = %s',
                                        (WORKER_SCHEMA,)).fetchone():
                database.execute_sql('CREATE SCHEMA "%s"' % WORKER_SCHEMA)
            app_schema = database.execute_sql('SELECT current_schema()').fetchone()[0]
        for model in WEBAPP_MODELS:
            table = model._meta.table_name
            if not database.table_exists(table):
                for statement in WEBAPP_DDL[table]:
                    database.execute_sql(statement)
                created.append(table)
        for model in WORKER_MODELS:
            name = model._meta.table_name
            exists = database.table_exists(name, schema=WORKER_SCHEMA)
            if app_schema not in (None, WORKER_SCHEMA) and database.table_exists(name, app_schema):
                _move_table(model, app_schema, whole=postgres and not exists)
            elif not exists:
                created.append(name)
        database.create_tables(WORKER_MODELS, safe=True)
    return created


def _move_table(model: type[Model], schema: str, whole: bool) -> None:
    """Move a worker table from ``schema``, the web app's (PostgreSQL) or its file
    ("main" on SQLite), into the worker's own, losing no row.  ``whole``: on PostgreSQL, with no table of that
    name there yet, the table moves as it is (indexes, sequence, owner).  Otherwise its
    rows are copied over (a row whose key is there already stays as it is, the copy
    being older) and the old table dropped."""
    name = model._meta.table_name
    source = '"%s"."%s"' % (schema.replace('"', '""'), name)
    if whole:
        database.execute_sql('ALTER TABLE %s SET SCHEMA "%s"' % (source, WORKER_SCHEMA))
        return
    database.create_tables([model], safe=True)
    columns = ', '.join('"%s"' % field.column_name for field in model._meta.sorted_fields
                        if not isinstance(field, AutoField))
    # WHERE true: SQLite would read "ON" as part of the SELECT's join.
    database.execute_sql('INSERT INTO "%s"."%s" (%s) SELECT %s FROM %s WHERE true ON CONFLICT DO NOTHING'
                         % (WORKER_SCHEMA, name, columns, columns, source))
    database.execute_sql('DROP TABLE %s' % source)
