"""Peewee models: WhiteNote's tables, mapped exactly, and the worker's own state.

The web app (Prisma on PostgreSQL, today on SQLite) owns "User", "AiConfig", "Message",
"Tag", "MessageTag" and "MessageVersion" (and, since workspaces, "Workspace", "Comment"
and "CommentTag"): quoted PascalCase tables, camelCase columns, text ids, naive UTC
timestamps (on SQLite, Prisma's text: see the times below).  The worker reads and
writes their rows but never changes their shape.
Its own state lives out of the web app's sight, in tables named ``whitenote_huey_*`` in
a schema of their own, "whitenote_huey": a PostgreSQL schema, or on SQLite a file
beside the app's, attached to each connection under that name.  Which WhiteNote the
database belongs to (its Shape) is read from its own columns; the statements that
differ between shapes are here, beside the models.
"""
import dataclasses
import datetime
import functools
import json
import operator
import os
import re
import secrets
import threading
import time
import typing

from peewee import SQL
from peewee import AutoField
from peewee import BooleanField
from peewee import Case
from peewee import CompositeKey
from peewee import DatabaseError
from peewee import DatabaseProxy
from peewee import DateField
from peewee import DateTimeField
from peewee import Expression
from peewee import ForeignKeyField
from peewee import IntegerField
from peewee import Model
from peewee import Node
from peewee import PostgresqlDatabase
from peewee import SqliteDatabase
from peewee import TextField
from peewee import Value
from peewee import fn

database = DatabaseProxy()

# Where the worker's own tables live, and their names as hand-written SQL must write
# them (qualified, so that the web app's schema never resolves them).
WORKER_SCHEMA = 'whitenote_huey'
JOB_TABLE = '"whitenote_huey"."whitenote_huey_job"'
BRIEFING_TABLE = '"whitenote_huey"."whitenote_huey_briefing"'
RUN_TABLE = '"whitenote_huey"."whitenote_huey_run"'
SWEEP_TABLE = '"whitenote_huey"."whitenote_huey_sweep"'
WORKSPACE_BRIEFING_TABLE = '"whitenote_huey"."whitenote_huey_workspace_briefing"'


def qualified(model: type[Model]) -> str:
    """A worker table's name as hand-written SQL writes it, in the worker's schema."""
    return '"%s"."%s"' % (WORKER_SCHEMA, model._meta.table_name)


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


# Which WhiteNote: the shapes of its schema the worker knows, told apart by their columns.

@dataclasses.dataclass(frozen=True)
class Shape:
    """One WhiteNote schema: its name, the upstream versions that have it, and the
    columns the worker reads or writes there (table to column names).

    ``workspaces``: notes live in workspaces, which hold the auto-tag and briefing
    switches and the RAGFlow dataset; comments carry tags; a message may have no
    author (a system message, such as the briefing).
    ``briefing_columns``: the web app keeps briefing settings (``briefingTime``,
    ``briefingModel``, an ``enableBriefing`` switch); without them the briefing is the
    worker's own, opt-in (WHITENOTE_BRIEFINGS, BRIEFING_TIME, the user's ``openaiModel``).
    ``app_runs_jobs``: the web app tags and syncs new notes in its own process, on a
    queue a restart empties: the worker does what was lost, never what the app did.
    ``text_dates``: the web app writes its times as Prisma's SQLite adapter does, as
    text (see app_time()).
    """
    name: str
    versions: str
    workspaces: bool
    columns: dict[str, frozenset[str]]
    briefing_columns: bool = True
    app_runs_jobs: bool = False
    text_dates: bool = False

    def missing(self, found: dict[str, set[str]]) -> list[str]:
        """The "Table.column" names this shape needs and ``found`` lacks."""
        return ['%s.%s' % (table, column)
                for table, columns in self.columns.items()
                for column in sorted(columns - found.get(table, set()))]


def _columns(**tables: str) -> dict[str, frozenset[str]]:
    return {table: frozenset(names.split()) for table, names in tables.items()}


_SHARED_COLUMNS = dict(
    User='id email',
    Tag='id name color createdAt',
    MessageTag='messageId tagId',
    MessageVersion='id content createdAt messageId',
)
STAGE7 = Shape('stage7', 'per-user switches in AiConfig (WhiteNote 1e0bd2b to 54b7f7d^)', False, _columns(
    **_SHARED_COLUMNS,
    Message='id title content createdAt updatedAt isStarred isPinned authorId',
    AiConfig='id userId openaiBaseUrl openaiApiKey ragflowBaseUrl ragflowApiKey ragflowDatasetId '
             'enableAutoTag autoTagModel enableBriefing briefingModel briefingTime aiPersonality '
             'aiExpertise',
))
WORKSPACES = Shape('workspaces', 'workspaces, comments and system messages (WhiteNote 54b7f7d to c39d8d0)',
                   True, _columns(
    **_SHARED_COLUMNS,
    Message='id title content createdAt updatedAt isStarred isPinned authorId workspaceId',
    AiConfig='id userId openaiBaseUrl openaiApiKey ragflowBaseUrl ragflowApiKey autoTagModel '
             'briefingModel briefingTime aiPersonality aiExpertise',
    Workspace='id name isDefault userId enableAutoTag enableBriefing ragflowDatasetId createdAt',
    Comment='id content createdAt messageId authorId',
    CommentTag='commentId tagId',
))
TODAY = Shape('today', 'SQLite, no Redis, no briefing (WhiteNote 36e5fc2 to caae1ff)', True, _columns(
    **_SHARED_COLUMNS,
    Message='id title content createdAt updatedAt isStarred isPinned authorId workspaceId',
    AiConfig='id userId openaiBaseUrl openaiApiKey openaiModel ragflowBaseUrl ragflowApiKey autoTagModel '
             'aiPersonality aiExpertise',
    Workspace='id name isDefault userId enableAutoTag ragflowDatasetId createdAt',
    Comment='id content createdAt messageId authorId',
    CommentTag='commentId tagId',
), briefing_columns=False, app_runs_jobs=True, text_dates=True)
SHAPES = (WORKSPACES, TODAY, STAGE7)  # the first whose columns are all there is the one


class UnknownShape(Exception):
    """The database is not a WhiteNote this worker knows; the message names what is missing."""


def database_columns() -> dict[str, set[str]]:
    """The web app's tables and their columns, as the database itself reports them."""
    if isinstance(database.obj, PostgresqlDatabase):
        rows = database.execute_sql(
            'SELECT "table_name", "column_name" FROM "information_schema"."columns" '
            'WHERE "table_schema" = current_schema()').fetchall()
    else:
        rows = database.execute_sql(
            "SELECT m.name, p.name FROM sqlite_master AS m, pragma_table_info(m.name) AS p "
            "WHERE m.type = 'table'").fetchall()
    found: dict[str, set[str]] = {}
    for table, column in rows:
        found.setdefault(table, set()).add(column)
    return found


def detect_shape() -> Shape:
    """Read the database's columns and decide which WhiteNote it is (kept for its
    connection's lifetime, see shape()); UnknownShape names what the nearest lacks."""
    found = database_columns()
    for candidate in SHAPES:
        if not candidate.missing(found):
            database.obj.whitenote_shape = candidate
            return candidate
    nearest = min(SHAPES, key=lambda candidate: len(candidate.missing(found)))
    raise UnknownShape('the database is not a WhiteNote this worker knows: nearest is %s (%s), '
                       'which needs %s' % (nearest.name, nearest.versions,
                                           ', '.join(nearest.missing(found))))


def shape() -> Shape:
    """The shape of the bound database: found at start, or on first use."""
    return getattr(database.obj, 'whitenote_shape', None) or detect_shape()


# Times in the web app's tables.
#
# Prisma on PostgreSQL keeps naive UTC in timestamp(3) columns.  Today's WhiteNote on
# SQLite (Prisma 7's better-sqlite3 adapter) writes a DateTime as text such as
# 2026-12-02T05:01:41.383+00:00, and reads back the other forms a row may hold:
# 2026-12-02 05:01:41 (SQLite's CURRENT_TIMESTAMP, and what the worker wrote before),
# with or without fractions, an offset, and epoch milliseconds.  SQLite compares text as
# text ('2026-12-01T15:00...' >= '2026-12-01 16:00:00' is true), so on SQLite every range
# over such a column is time_range()'s, rows are ordered by sortable_time(), what is read
# goes through parse_time(), and what the worker writes through app_time().

_TIME_TEXT = re.compile(r'\s*(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?)?'
                        r'\s*(Z|[+-]\d{2}(?::?\d{2})?)?\s*', re.IGNORECASE)
_EPOCH = datetime.datetime(1970, 1, 1)
_NORMAL_TIME = '%Y-%m-%d %H:%M:%f'  # SQLite's strftime(): what it makes of any form, in UTC, to the ms
_FAR = 1 << 62  # beyond any epoch milliseconds


def parse_time(value: object) -> datetime.datetime | None:
    """A time from the web app's tables, in any form they hold (a datetime, Prisma's
    text, SQLite's, epoch milliseconds), as naive UTC; None stays None.  ValueError
    names a value that is no time."""
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo is None else value.astimezone(datetime.UTC).replace(tzinfo=None)
    if isinstance(value, datetime.date):
        return datetime.datetime.combine(value, datetime.time())
    if isinstance(value, bytes):
        value = value.decode('ascii', 'replace')
    if isinstance(value, str) and value.strip().lstrip('-').isdigit():
        value = int(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _EPOCH + datetime.timedelta(milliseconds=value)
    match = _TIME_TEXT.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError('not a time: %r' % (value if not isinstance(value, str) else value[:40]))
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    when = datetime.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                             int(second or 0), int((fraction or '0')[:6].ljust(6, '0')))
    if zone and zone.upper() != 'Z':
        digits = zone[1:].replace(':', '').ljust(4, '0')
        offset = datetime.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        when = when - offset if zone[0] == '+' else when + offset
    return when


def text_dates() -> bool:
    """Whether the bound database's web app writes its times as text (today's, on SQLite)."""
    if not isinstance(database.obj, SqliteDatabase):
        return False
    try:
        return shape().text_dates
    except UnknownShape:
        return False


def app_time(value: datetime.datetime) -> 'datetime.datetime | str':
    """A naive UTC time as the bound database's web app writes it: Prisma's SQLite
    adapter's text (2026-12-02T05:01:41.383+00:00) beside today's WhiteNote, else as
    it is (PostgreSQL's timestamp, the embedded database's text)."""
    if not isinstance(value, datetime.datetime) or not text_dates():
        return value
    return parse_time(value).isoformat(timespec='milliseconds') + '+00:00'


class AppDateTimeField(DateTimeField):
    """A DateTime column of the web app's tables: written as its web app writes it
    (app_time), read from any form a row holds (parse_time)."""

    def db_value(self, value):
        return app_time(value) if isinstance(value, datetime.datetime) else super().db_value(value)

    def python_value(self, value):
        return parse_time(value)


def _ceil_millis(when: datetime.datetime) -> datetime.datetime:
    """``when`` up to the next millisecond: the web app's times have no finer grain."""
    extra = when.microsecond % 1000
    return when + datetime.timedelta(microseconds=1000 - extra) if extra else when


def time_range(column: Node, start: datetime.datetime | None,
               end: datetime.datetime | None) -> Expression:
    """Where ``column``, a time of the web app's tables, is in [start, end) (naive UTC,
    None for no bound), whatever form each row holds.

    On SQLite: rows holding text within a day of the range either side (an index range
    that takes every form of text, offsets of up to a day included), of which those whose
    time, as SQLite reads it, is in the range; or rows holding epoch milliseconds in it.
    """
    if not isinstance(database.obj, SqliteDatabase):
        bounds = ([] if start is None else [column >= start]) + ([] if end is None else [column < end])
        return functools.reduce(operator.and_, bounds) if bounds else Value(1) == 1
    start, end = (None if when is None else _ceil_millis(when) for when in (start, end))
    day = datetime.timedelta(days=1)
    low_text = '' if start is None or start < datetime.datetime.min + day else (start - day).date().isoformat()
    high_text = '~' if end is None or end > datetime.datetime.max - day else (end + day).date().isoformat() + '~'
    low_time = '' if start is None else start.isoformat(' ', 'milliseconds')
    high_time = '~' if end is None else end.isoformat(' ', 'milliseconds')
    normal = fn.strftime(_NORMAL_TIME, column)
    as_text = ((column >= Value(low_text, converter=False)) & (column < Value(high_text, converter=False))
               & (normal >= low_time) & (normal < high_time))
    low_millis = -_FAR if start is None else (start - _EPOCH) // datetime.timedelta(milliseconds=1)
    high_millis = _FAR if end is None else (end - _EPOCH) // datetime.timedelta(milliseconds=1)
    as_millis = (column >= Value(low_millis, converter=False)) & (column < Value(high_millis, converter=False))
    return as_text | as_millis


def time_range_sql(column: str, start: datetime.datetime | None,
                   end: datetime.datetime | None) -> tuple[str, list]:
    """time_range() for hand-written SQL: its text and parameters, ``column`` as SQL names it."""
    text, params = database.get_sql_context().sql(time_range(SQL(column), start, end)).query()
    return text, list(params)


def sortable_time(column: Node) -> Node:
    """What orders rows by ``column``, a time of the web app's tables, as times: on SQLite,
    whatever form each row holds, the text SQLite makes of it in UTC."""
    if not isinstance(database.obj, SqliteDatabase):
        return column
    return Case(None, [(fn.typeof(column) == 'integer',
                        fn.strftime(_NORMAL_TIME, column / 1000.0, 'unixepoch'))],
                fn.strftime(_NORMAL_TIME, column))


# WhiteNote's tables.

class User(BaseModel):
    id = TextField(primary_key=True, default=new_id)
    email = TextField(unique=True)
    password_hash = TextField(column_name='passwordHash', default='')
    name = TextField(null=True)
    avatar = TextField(null=True)
    created_at = AppDateTimeField(column_name='createdAt', default=utcnow)
    updated_at = AppDateTimeField(column_name='updatedAt', default=utcnow)
    email_verified = AppDateTimeField(column_name='emailVerified', null=True)

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
    rag_time_filter_start = AppDateTimeField(column_name='ragTimeFilterStart', null=True)
    rag_time_filter_end = AppDateTimeField(column_name='ragTimeFilterEnd', null=True)
    enable_auto_tag = BooleanField(column_name='enableAutoTag', default=True)
    auto_tag_model = TextField(column_name='autoTagModel', default='gpt-3.5-turbo')
    enable_briefing = BooleanField(column_name='enableBriefing', default=True)
    briefing_model = TextField(column_name='briefingModel', default='gpt-3.5-turbo')
    briefing_time = TextField(column_name='briefingTime', default='08:00')
    ai_personality = TextField(column_name='aiPersonality', default='friendly')
    ai_expertise = TextField(column_name='aiExpertise', null=True)
    enable_link_suggestion = BooleanField(column_name='enableLinkSuggestion', default=True)
    updated_at = AppDateTimeField(column_name='updatedAt', default=utcnow)

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
    created_at = AppDateTimeField(column_name='createdAt', default=utcnow)
    updated_at = AppDateTimeField(column_name='updatedAt', default=utcnow)
    is_starred = BooleanField(column_name='isStarred', default=False)
    is_pinned = BooleanField(column_name='isPinned', default=False)
    # Null for a system message (workspaces); "workspaceId" is read by the SQL of that shape.
    author = ForeignKeyField(User, column_name='authorId', object_id_name='author_id',
                             on_delete='CASCADE')
    # The first shape only: a query of every column of "Message" runs on that shape alone.
    parent = ForeignKeyField('self', column_name='parentId', object_id_name='parent_id', null=True,
                             on_delete='SET NULL')

    class Meta:
        table_name = 'Message'

    @classmethod
    def add(cls, message_id: str, author_id: str | None, content: str, pinned: bool,
            now: datetime.datetime, workspace_id: str | None = None) -> None:
        """Insert a message the worker writes (a briefing), as the web app would; with
        ``workspace_id`` (workspaces only) in that workspace."""
        columns = ['id', 'content', 'createdAt', 'updatedAt', 'isStarred', 'isPinned', 'authorId']
        values = [message_id, content, app_time(now), app_time(now), False, pinned, author_id]
        if workspace_id is not None:
            columns.append('workspaceId')
            values.append(workspace_id)
        database.execute_sql(sql('INSERT INTO "Message" (%s) VALUES (%s)' % (
            ', '.join('"%s"' % name for name in columns), placeholders(len(columns)))), values)

    @classmethod
    def content_of(cls, message_id: str) -> 'Message | Content | None':
        """The message's id, author and content, what a job reads; None once it is gone.
        With workspaces, a Content, which also says where it belongs."""
        if shape().workspaces:
            return content_of('message', message_id)
        for message in cls.raw(sql('SELECT "id", "authorId", "content" FROM "Message" '
                                   'WHERE "id" = ?'), message_id):
            return message
        return None


class Tag(BaseModel):
    id = TextField(primary_key=True, default=new_id)
    name = TextField(unique=True)
    color = TextField(null=True)
    created_at = AppDateTimeField(column_name='createdAt', default=utcnow)

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


class TagLinks(BaseModel):
    """What "MessageTag" and "CommentTag" share: each row puts a tag on one message, or
    on one comment; ``content_column`` names that column."""
    content_column = ''

    @classmethod
    def content_field(cls) -> ForeignKeyField:
        return cls._meta.columns[cls.content_column]

    @classmethod
    def links_of(cls, content_id: str) -> dict[str, str]:
        """The tags on one message (or comment): tag id to tag name."""
        cursor = database.execute_sql(sql(
            'SELECT "Tag"."id", "Tag"."name" FROM "{0}" '
            'JOIN "Tag" ON "Tag"."id" = "{0}"."tagId" '
            'WHERE "{0}"."{1}" = ?'.format(cls._meta.table_name, cls.content_column)), (content_id,))
        return dict(cursor.fetchall())

    @classmethod
    def link(cls, content_id: str, tag_ids: list[str]) -> None:
        """Put these tags on it; links it has already stay as they are."""
        if tag_ids:
            database.execute_sql(sql(
                'INSERT INTO "%s" ("%s", "tagId") VALUES %s ON CONFLICT DO NOTHING'
                % (cls._meta.table_name, cls.content_column, ', '.join(['(?, ?)'] * len(tag_ids)))),
                [value for tag_id in tag_ids for value in (content_id, tag_id)])

    @classmethod
    def unlink(cls, content_id: str, tag_ids: list[str]) -> None:
        """Take these tags off it."""
        (cls
         .delete()
         .where((cls.content_field() == content_id) & cls.tag.in_(tag_ids))
         .execute())


class MessageTag(TagLinks):
    message = ForeignKeyField(Message, column_name='messageId', object_id_name='message_id',
                              on_delete='CASCADE')
    tag = ForeignKeyField(Tag, column_name='tagId', object_id_name='tag_id', on_delete='CASCADE')
    content_column = 'messageId'

    class Meta:
        table_name = 'MessageTag'
        primary_key = CompositeKey('message', 'tag')


class MessageVersion(BaseModel):
    id = TextField(primary_key=True, default=new_id)
    content = TextField()
    created_at = AppDateTimeField(column_name='createdAt', default=utcnow)
    message = ForeignKeyField(Message, column_name='messageId', object_id_name='message_id',
                              on_delete='CASCADE')

    class Meta:
        table_name = 'MessageVersion'


# The tables of the workspaces shape (never created by the worker).

class Workspace(BaseModel):
    id = TextField(primary_key=True, default=new_id)
    name = TextField()
    is_default = BooleanField(column_name='isDefault', default=False)
    ragflow_dataset_id = TextField(column_name='ragflowDatasetId', null=True)
    enable_auto_tag = BooleanField(column_name='enableAutoTag', default=True)
    enable_briefing = BooleanField(column_name='enableBriefing', default=True)
    user = ForeignKeyField(User, column_name='userId', object_id_name='user_id', on_delete='CASCADE')
    created_at = AppDateTimeField(column_name='createdAt', default=utcnow)
    updated_at = AppDateTimeField(column_name='updatedAt', default=utcnow)

    class Meta:
        table_name = 'Workspace'


class Comment(BaseModel):
    id = TextField(primary_key=True, default=new_id)
    content = TextField()
    created_at = AppDateTimeField(column_name='createdAt', default=utcnow)
    updated_at = AppDateTimeField(column_name='updatedAt', default=utcnow)
    is_ai_bot = BooleanField(column_name='isAIBot', default=False)
    message = ForeignKeyField(Message, column_name='messageId', object_id_name='message_id',
                              on_delete='CASCADE')
    author = ForeignKeyField(User, column_name='authorId', object_id_name='author_id', null=True)

    class Meta:
        table_name = 'Comment'


class CommentTag(TagLinks):
    comment = ForeignKeyField(Comment, column_name='commentId', object_id_name='comment_id',
                              on_delete='CASCADE')
    tag = ForeignKeyField(Tag, column_name='tagId', object_id_name='tag_id', on_delete='CASCADE')
    content_column = 'commentId'

    class Meta:
        table_name = 'CommentTag'
        primary_key = CompositeKey('comment', 'tag')


class Content(typing.NamedTuple):
    """A message or comment as a job of the workspaces shape reads it, with where it belongs.

    Its workspace is its message's own, else the default one (``isDefault``) of that
    message's author, as the web app's routes decide.  ``owner_id``: the workspace's
    owner, whose AiConfig holds the RAGFlow key and URL.  ``tagger_id``: whose model and
    tags tag it; None for a system message (no author), which is never tagged; a
    comment with no author (the AI bot's) is tagged for its message's author.
    """
    id: str
    author_id: str | None
    content: str
    workspace_id: str | None
    owner_id: str | None
    tagger_id: str | None
    auto_tag: bool
    dataset_id: str | None


_WORKSPACE_OF_MESSAGE = (
    'LEFT JOIN "Workspace" AS w ON w."id" = COALESCE(m."workspaceId", '
    '(SELECT d."id" FROM "Workspace" AS d WHERE d."userId" = m."authorId" AND d."isDefault" '
    'ORDER BY d."createdAt", d."id" LIMIT 1)) ')
_PLACE = 'w."id", w."userId", %s, w."enableAutoTag", w."ragflowDatasetId" '
CONTENT_SQL = {
    'message': ('SELECT m."id", m."authorId", m."content", ' + _PLACE % 'm."authorId"'
                + 'FROM "Message" AS m ' + _WORKSPACE_OF_MESSAGE + 'WHERE m."id" IN (%s)'),
    'comment': ('SELECT c."id", c."authorId", c."content", '
                + _PLACE % 'COALESCE(c."authorId", m."authorId", w."userId")'
                + 'FROM "Comment" AS c JOIN "Message" AS m ON m."id" = c."messageId" '
                + _WORKSPACE_OF_MESSAGE + 'WHERE c."id" IN (%s)'),
}


def contents(kind: str, ids: list[str]) -> dict[str, Content]:
    """These messages (``kind`` "message") or comments, with where they belong, by id: one
    query (workspaces shape)."""
    if not ids:
        return {}
    cursor = database.execute_sql(sql(CONTENT_SQL[kind] % placeholders(len(ids))), list(ids))
    return {row[0]: Content(*row[:6], bool(row[6]), row[7]) for row in cursor.fetchall()}


def content_of(kind: str, content_id: str) -> Content | None:
    return contents(kind, [content_id]).get(content_id)


# The workspaces shape's briefings: one per workspace and day, a system message in it.

# The ids of the briefing messages the worker made for the workspace (one parameter), in SQL.
MADE_WORKSPACE_BRIEFING_IDS = ('(SELECT "message_id" FROM %s '
                               'WHERE "workspace_id" = ? AND "message_id" IS NOT NULL)'
                               % WORKSPACE_BRIEFING_TABLE)
# The workspace's messages (three parameters: its id, its owner, whether it is the
# owner's default, which also holds the owner's messages in no workspace).
_IN_WORKSPACE = '("workspaceId" = ? OR ("workspaceId" IS NULL AND "authorId" = ? AND ?))'


def briefing_workspaces() -> list[tuple[str, str | None]]:
    """(workspace id, its owner's briefingTime) of the workspaces with the briefing on;
    an owner with no AiConfig row has the default time (None).  A WhiteNote with no
    briefing columns (the briefing is the worker's own): every workspace, at the
    default time; one with no notes that day gets none."""
    if not shape().briefing_columns:
        return database.execute_sql('SELECT "id", NULL FROM "Workspace" ORDER BY "id"').fetchall()
    return database.execute_sql(
        'SELECT w."id", a."briefingTime" FROM "Workspace" AS w '
        'LEFT JOIN "AiConfig" AS a ON a."userId" = w."userId" '
        'WHERE w."enableBriefing" '
        'ORDER BY w."id"').fetchall()


def workspace(workspace_id: str) -> Workspace | None:
    """The workspace, with the columns this WhiteNote has (``enable_briefing`` None where
    it has no such switch); None if there is none of that id."""
    fields = [Workspace.id, Workspace.name, Workspace.is_default, Workspace.user,
              Workspace.enable_auto_tag, Workspace.ragflow_dataset_id]
    if shape().briefing_columns:
        fields.append(Workspace.enable_briefing)
    return (Workspace
            .select(*fields)
            .where(Workspace.id == workspace_id)
            .first())


def workspace_day(workspace: Workspace, title: str, any_title: str, start: datetime.datetime,
                  end: datetime.datetime) -> list[Message]:
    """In one query: the workspace's messages that start with ``title`` (a briefing of
    the day, made already), and those created in [start, end), oldest first, but
    briefings (starting with ``any_title``, or made by the worker)."""
    created, created_params = time_range_sql('"createdAt"', start, end)
    found = list(Message.raw(sql(
        'SELECT "id", "content", "createdAt" FROM "Message" '
        'WHERE ' + _IN_WORKSPACE + ' '
        'AND ("content" LIKE ? ESCAPE \'\\\' '
        'OR (' + created + ' '
        'AND "content" NOT LIKE ? ESCAPE \'\\\' '
        'AND "id" NOT IN ' + MADE_WORKSPACE_BRIEFING_IDS + '))'),
        workspace.id, workspace.user_id, workspace.is_default, like_prefix(title), *created_params,
        like_prefix(any_title), workspace.id))
    return sorted(found, key=lambda message: (message.created_at, message.id))


def pinned_workspace_briefings(workspace_id: str, any_title: str) -> list[tuple[str, str]]:
    """(id, content) of the workspace's pinned briefings: system messages in it that start
    with ``any_title`` or that the worker made."""
    return database.execute_sql(sql(
        'SELECT "id", "content" FROM "Message" '
        'WHERE "workspaceId" = ? AND "authorId" IS NULL AND "isPinned" '
        'AND ("content" LIKE ? ESCAPE \'\\\' '
        'OR "id" IN ' + MADE_WORKSPACE_BRIEFING_IDS + ')'),
        (workspace_id, like_prefix(any_title), workspace_id)).fetchall()


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
    or how long a queued job may wait.  ``owner`` is the token of the run that claimed
    the row last: a run writes only while the row is still its own.  ``lost_runs``
    counts the runs that died holding the row (their lease ran out) since an outcome
    was last recorded.
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
    owner = TextField(null=True)
    lost_runs = IntegerField(default=0)

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
    def claim(cls, kind: str, message_id: str, user_id: str, owner: str, input_hash: str,
              now: datetime.datetime, lease_until: datetime.datetime, exists: bool) -> bool:
        """Mark the job running for this input and ``owner`` unless a live run holds its
        row (status running, lease not yet over); a missing row is made already claimed.
        Taking over a run whose lease ran out counts it in ``lost_runs``.  One atomic
        statement, so two workers on one message cannot both proceed.  ``exists``: the
        row was read, so a plain UPDATE does (an upsert takes a number of the id
        sequence on PostgreSQL each time, even when the row is there)."""
        free = ('"job"."status" != \'running\' '
                'OR "job"."lease_until" IS NULL '
                'OR "job"."lease_until" <= ?')
        lost = ('CASE WHEN "job"."status" = \'running\' '
                'THEN "job"."lost_runs" + 1 ELSE "job"."lost_runs" END')
        if exists:
            statement = ('UPDATE %s AS "job" SET "status" = \'running\', "owner" = ?, '
                         '"content_hash" = ?, "attempts" = "attempts" + 1, "lost_runs" = %s, '
                         '"lease_until" = ?, "updated_at" = ? '
                         'WHERE "kind" = ? AND "message_id" = ? AND (%s)' % (JOB_TABLE, lost, free))
            params = (owner, input_hash, lease_until, now, kind, message_id, now)
        else:
            statement = (
                'INSERT INTO %s AS "job" ("kind", "message_id", "user_id", "status", "owner", '
                '"content_hash", "attempts", "lost_runs", "tags_added", "lease_until", "created_at", '
                '"updated_at") '
                "VALUES (?, ?, ?, 'running', ?, ?, 1, 0, '[]', ?, ?, ?) "
                'ON CONFLICT ("kind", "message_id") DO UPDATE SET '
                '"status" = excluded."status", "owner" = excluded."owner", '
                '"content_hash" = excluded."content_hash", '
                '"attempts" = "job"."attempts" + 1, "lost_runs" = %s, '
                '"lease_until" = excluded."lease_until", "updated_at" = excluded."updated_at" '
                'WHERE %s' % (JOB_TABLE, lost, free))
            params = (kind, message_id, user_id, owner, input_hash, lease_until, now, now, now)
        return database.execute_sql(sql(statement), params).rowcount == 1

    @classmethod
    def write(cls, kind: str, message_id: str, owner: str, **fields) -> int:
        """Set these columns of the job's row while ``owner`` holds it; 0 once it does not."""
        statement = update_sql(JOB_TABLE, tuple(fields), ('kind', 'message_id', 'owner'),
                               database.param)
        return database.execute_sql(statement, (*fields.values(), kind, message_id, owner)).rowcount

    @classmethod
    def write_unclaimed(cls, read: 'JobState', now: datetime.datetime, **fields) -> int:
        """Set these columns of the job's row for a run that holds no claim: only if the
        row is as the run ``read`` it (or still missing) and no live run holds it.
        Returns the number of rows written (0: the row moved on, the outcome is stale)."""
        table = JOB_TABLE
        if read.id is None:
            row = {'kind': read.kind, 'message_id': read.message_id, 'user_id': read.user_id,
                   'status': 'pending', 'attempts': 0, 'lost_runs': 0, 'tags_added': '[]',
                   'created_at': now, **fields}
            statement = 'INSERT INTO %s (%s) VALUES (%s) ON CONFLICT ("kind", "message_id") DO NOTHING' % (
                table, ', '.join('"%s"' % name for name in row), placeholders(len(row)))
            return database.execute_sql(sql(statement), tuple(row.values())).rowcount
        statement = ('UPDATE %s SET %s WHERE "kind" = ? AND "message_id" = ? AND "status" = ? '
                     'AND "updated_at" = ? AND NOT ("status" = \'running\' AND "lease_until" > ?)' % (
                         table, ', '.join('"%s" = ?' % name for name in fields)))
        return database.execute_sql(sql(statement), (*fields.values(), read.kind, read.message_id,
                                                     read.status, read.updated_at, now)).rowcount

    @classmethod
    def owned(cls, kind: str, message_id: str, owner: str, now: datetime.datetime) -> bool:
        """Whether ``owner`` still holds the job's row under a live lease."""
        cursor = database.execute_sql(sql(
            'SELECT 1 FROM %s WHERE "kind" = ? AND "message_id" = ? '
            'AND "owner" = ? AND "status" = \'running\' AND "lease_until" > ?' % JOB_TABLE),
            (kind, message_id, owner, now))
        return cursor.fetchone() is not None


class Briefing(BaseModel):
    """One user's daily briefing for one local day (the day it summarises).

    The unique (user_id, day) row decides who makes the briefing: a run claims it
    (status "running", its token in ``owner``, a lease), asks the model outside any
    transaction, then writes the message and marks the row "done" in one transaction,
    only while it still owns the row.  A claim whose lease ran out can be taken over,
    and the run that lost it can no longer write.  ``lost_runs`` counts the runs that
    died holding the day (their lease ran out) since an outcome was last recorded.
    ``subject`` names the column whose briefing it is (a user's here, a workspace's in
    WorkspaceBriefing).
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
    lost_runs = IntegerField(default=0)
    subject = 'user_id'

    class Meta:
        table_name = 'whitenote_huey_briefing'
        schema = WORKER_SCHEMA
        indexes = ((('user_id', 'day'), True),)

    @classmethod
    def lookup(cls, subject_id: str, day: datetime.date) -> 'Briefing':
        """The row for this user (or workspace) and day, or a new unsaved one: one read, no write."""
        for row in cls.raw(sql('SELECT * FROM %s WHERE "%s" = ? AND "day" = ?'
                               % (qualified(cls), cls.subject)), subject_id, day):
            return row
        return cls(**{cls.subject: subject_id, 'day': day})

    @classmethod
    def claim(cls, subject_id: str, day: datetime.date, owner: str, statuses: tuple[str, ...],
              now: datetime.datetime, lease_until: datetime.datetime) -> bool:
        """Take the day for ``owner`` if its row is missing, in one of ``statuses``, or
        running under a lease that ran out (counted in ``lost_runs``).  One atomic
        statement: of two runs at once, one proceeds."""
        cursor = database.execute_sql(sql(
            'INSERT INTO {0} AS "briefing" ("{1}", "day", "status", "owner", '
            '"attempts", "lost_runs", "lease_until", "created_at", "updated_at") '
            "VALUES (?, ?, 'running', ?, 1, 0, ?, ?, ?) "
            'ON CONFLICT ("{1}", "day") DO UPDATE SET '
            '"status" = excluded."status", "owner" = excluded."owner", '
            '"attempts" = "briefing"."attempts" + 1, '
            '"lost_runs" = CASE WHEN "briefing"."status" = \'running\' '
            'THEN "briefing"."lost_runs" + 1 ELSE "briefing"."lost_runs" END, '
            '"lease_until" = excluded."lease_until", "updated_at" = excluded."updated_at" '
            'WHERE "briefing"."status" IN ({2}) '
            'OR ("briefing"."status" = \'running\' '
            'AND "briefing"."lease_until" < ?)'.format(qualified(cls), cls.subject,
                                                       placeholders(len(statuses)))),
            (subject_id, day, owner, lease_until, now, now, *statuses, now))
        return cursor.rowcount == 1

    @classmethod
    def write(cls, subject_id: str, day: datetime.date, owner: str, **fields) -> int:
        """Set these columns of the day's row while ``owner`` holds it; 0 once it does not."""
        statement = update_sql(qualified(cls), tuple(fields), (cls.subject, 'day', 'owner'),
                               database.param)
        return database.execute_sql(statement, (*fields.values(), subject_id, day, owner)).rowcount


class WorkspaceBriefing(Briefing):
    """One workspace's daily briefing for one local day (workspaces shape), decided by
    its unique (workspace_id, day) row as Briefing's is; ``user_id`` is the workspace's
    owner, written once the run has read the workspace."""
    workspace_id = TextField()
    user_id = TextField(null=True)
    subject = 'workspace_id'

    class Meta:
        table_name = 'whitenote_huey_workspace_briefing'
        indexes = ((('workspace_id', 'day'), True),)


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


WORKER_MODELS = (JobState, Briefing, WorkspaceBriefing, WorkerRun, SweepCursor)

# Columns added to the worker's tables after they were first made: (model, column, type).
ADDED_COLUMNS = ((JobState, 'owner', 'TEXT'),
                 (JobState, 'lost_runs', 'INTEGER NOT NULL DEFAULT 0'),
                 (Briefing, 'lost_runs', 'INTEGER NOT NULL DEFAULT 0'))


def add_missing_columns() -> list[str]:
    """Add the ADDED_COLUMNS a worker's table made by an older version lacks; each in a
    transaction of its own, so that of two workers starting at once, one adds it."""
    added = []
    for model, column, kind in ADDED_COLUMNS:
        table = model._meta.table_name
        if column in {found.name for found in database.get_columns(table, WORKER_SCHEMA)}:
            continue
        try:
            with database.atomic():
                database.execute_sql('ALTER TABLE %s ADD COLUMN "%s" %s' % (qualified(model), column, kind))
            added.append('%s.%s' % (table, column))
        except DatabaseError:
            if column not in {found.name for found in database.get_columns(table, WORKER_SCHEMA)}:
                raise
    return added


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
    added = add_missing_columns()
    try:
        detect_shape()  # what the tables now make, known before the first job asks
    except UnknownShape:
        pass  # said at start (check_database_at_start, the command line), and by shape()
    return created + added


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
    old = {column.name for column in database.get_columns(name, schema)}  # an older version's
    columns = ', '.join('"%s"' % field.column_name for field in model._meta.sorted_fields
                        if not isinstance(field, AutoField) and field.column_name in old)
    # WHERE true: SQLite would read "ON" as part of the SELECT's join.
    database.execute_sql('INSERT INTO %s (%s) SELECT %s FROM %s WHERE true ON CONFLICT DO NOTHING'
                         % (qualified(model), columns, columns, source))
    database.execute_sql('DROP TABLE %s' % source)
