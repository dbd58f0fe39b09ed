"""Peewee models: WhiteNote's tables, mapped exactly, and the worker's own state.

The web app (Prisma on PostgreSQL) owns "User", "AiConfig", "Message", "Tag",
"MessageTag" and "MessageVersion": quoted PascalCase tables, camelCase columns,
text ids, naive UTC timestamps.  The worker reads and writes their rows but never
changes their shape; its own state lives in tables prefixed ``whitenote_huey_``.
"""
import datetime
import json
import os
import secrets
import threading
import time

from peewee import JOIN
from peewee import BooleanField
from peewee import CompositeKey
from peewee import DatabaseProxy
from peewee import DateField
from peewee import DateTimeField
from peewee import Field
from peewee import ForeignKeyField
from peewee import IntegerField
from peewee import Model
from peewee import TextField
from peewee import fn

database = DatabaseProxy()


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


class BaseModel(Model):
    class Meta:
        database = database


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
    def for_user(cls, user_id: str, *fields: Field) -> 'AiConfig':
        """The user's settings, or the web app's defaults when the user has no row.

        Given ``fields``, only those are read (the rest stay None): a job that needs
        a few of the 21 settings builds and parses a fraction of the query.
        """
        config = cls.select(*fields).where(cls.user == user_id).get_or_none()
        return config if config is not None else cls(user=user_id)

    @classmethod
    def for_existing_user(cls, user_id: str, *fields: Field) -> 'AiConfig | None':
        """for_user(), and in the same query whether the user exists: None if not."""
        config = (User
                  .select(User.id.alias('user_id'), cls.id, *(fields or (cls,)))
                  .join(cls, JOIN.LEFT_OUTER, on=(cls.user == User.id))
                  .where(User.id == user_id)
                  .objects(cls)
                  .get_or_none())
        return config if config is None or config.id is not None else cls(user=user_id)


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
        return cls.upsert_all([name], color)[0]

    @classmethod
    def upsert_all(cls, names: list[str], color: str | None = None) -> list['Tag']:
        """The tags of these names (ignoring case), in order, created if missing.

        One query when all exist (and need no colour), three when some are new; safe
        under races.  ``color`` as in upsert().
        """
        if not names:
            return []

        def existing() -> dict:
            folded = fn.LOWER(cls.name)
            found = {}
            for tag in (cls
                        .select(cls, folded.alias('folded'))
                        .where(folded.in_([name.lower() for name in names]))
                        .order_by(cls.created_at)):
                found.setdefault(tag.folded, tag)
            return found

        found = existing()
        missing = list({name.lower(): name for name in reversed(names)
                        if name.lower() not in found}.values())
        uncoloured = [tag.id for tag in found.values() if not tag.color] if color else []
        if uncoloured:
            (cls
             .update(color=color)
             .where(cls.id.in_(uncoloured) & (cls.color.is_null() | (cls.color == '')))
             .execute())
        if missing:
            (cls
             .insert_many([{'id': new_id(), 'name': name, 'color': color} for name in missing])
             .on_conflict_ignore()
             .execute())
        if missing or uncoloured:
            found = existing()
        return [found.get(name.lower()) or cls.get(cls.name == name) for name in names]


class MessageTag(BaseModel):
    message = ForeignKeyField(Message, column_name='messageId', object_id_name='message_id',
                              on_delete='CASCADE')
    tag = ForeignKeyField(Tag, column_name='tagId', object_id_name='tag_id', on_delete='CASCADE')

    class Meta:
        table_name = 'MessageTag'
        primary_key = CompositeKey('message', 'tag')


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
    is seen as work to do again.
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
        indexes = ((('kind', 'message_id'), True),)

    @property
    def added_tag_ids(self) -> list[str]:
        return json.loads(self.tags_added or '[]')

    @classmethod
    def lookup(cls, kind: str, message_id: str, user_id: str) -> 'JobState':
        """The state row for this job, or a new unsaved one: one read, no write."""
        state = cls.get_or_none((cls.kind == kind) & (cls.message_id == message_id))
        return state if state is not None else cls(kind=kind, message_id=message_id, user_id=user_id)

    @classmethod
    def for_message(cls, kind: str, message_id: str, user_id: str) -> 'JobState':
        """The state row for this job, created if missing (races end in one row)."""
        cls.insert(kind=kind, message_id=message_id, user_id=user_id).on_conflict_ignore().execute()
        return cls.get((cls.kind == kind) & (cls.message_id == message_id))


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
        indexes = ((('user_id', 'day'), True),)

    @classmethod
    def lookup(cls, user_id: str, day: datetime.date) -> 'Briefing':
        """The row for this user and day, or a new unsaved one: one read, no write."""
        row = cls.get_or_none((cls.user_id == user_id) & (cls.day == day))
        return row if row is not None else cls(user_id=user_id, day=day)


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


WORKER_MODELS = (JobState, Briefing, WorkerRun)


def create_tables() -> list[str]:
    """Create what is missing: a web-app table only if absent, the worker's own always.

    On a WhiteNote database this touches nothing of the web app's; on an empty one
    it creates the web app's tables as the web app would have.
    """
    created = []
    with database.atomic():
        for model in WEBAPP_MODELS:
            table = model._meta.table_name
            if not database.table_exists(table):
                for statement in WEBAPP_DDL[table]:
                    database.execute_sql(statement)
                created.append(table)
        for model in WORKER_MODELS:
            if not database.table_exists(model._meta.table_name):
                created.append(model._meta.table_name)
        database.create_tables(WORKER_MODELS, safe=True)
    return created
