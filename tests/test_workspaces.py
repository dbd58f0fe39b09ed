"""WhiteNote with workspaces (c39d8d0), on SQLite and PostgreSQL, with the schema as Prisma
creates it: the shape found from the columns, the jobs per workspace, comments, system
messages, and one upload per new note on both shapes.
"""
import dataclasses
import datetime
import os
import re
import secrets
import sqlite3
from zoneinfo import ZoneInfo

import pytest
from fake_model import error
from fake_model import tags
from fake_model import text
from services import TODAY_SQL
from services import Consumer
from services import add_ai_config
from services import cli
from services import drain
from services import job_state
from services import make_message
from services import make_user
from services import make_workspace
from services import make_ws_message
from services import model_config
from services import move_message
from services import ragflow_config
from services import tag_names
from services import worker_env
from services import ws_message
from test_sync_ragflow import own_docs

import models
import whitenote_huey
from models import Comment
from models import CommentTag
from models import Message
from models import Tag

pytestmark = pytest.mark.usefixtures('redis_queue')

DAY = datetime.date(2026, 11, 27)
ANSWER = '## 📝 昨日回顾\n读了书。'
SHANGHAI = ZoneInfo('Asia/Shanghai')


def owner(model=None, ragflow=None, **columns):
    """A user with an AiConfig row of the workspaces shape: the fake model's endpoint and
    key, and a RAGFlow key of their own; (user, RAGFlow key)."""
    user = make_user()
    key = 'ragflow-key-%s' % secrets.token_hex(6)
    if model is not None:
        columns.update(openaiBaseUrl=model.url, openaiApiKey=model.api_key)
    if ragflow is not None:
        columns.update(ragflowBaseUrl=ragflow.url, ragflowApiKey=key)
    add_ai_config(user, **columns)
    return user, key


def comment_tags(comment_id: str) -> list[str]:
    return sorted(tag.name for tag in Tag.select(Tag.name).join(CommentTag)
                  .where(CommentTag.comment == comment_id))


def uploads(ragflow) -> list:
    return [request for request in ragflow.requests if request.files]


def earlier_id(when: datetime.datetime) -> str:
    """A cuid made at ``when``, as the web app's would be."""
    return models.id_floor(when) + models.new_id()[9:]


def later(seconds: float) -> datetime.datetime:
    return models.utcnow() + datetime.timedelta(seconds=seconds)


def local(day: datetime.date, *time: int, zone: ZoneInfo = SHANGHAI) -> datetime.datetime:
    """The naive UTC of a local wall time."""
    moment = datetime.datetime.combine(day, datetime.time(*time), zone)
    return moment.astimezone(datetime.UTC).replace(tzinfo=None)


@pytest.fixture
def shanghai(monkeypatch):
    monkeypatch.setattr(whitenote_huey, 'settings', dataclasses.replace(
        whitenote_huey.settings, timezone=SHANGHAI))


# The shape, found by looking.

def test_the_first_shape_is_found_from_its_columns(db):
    assert models.detect_shape() is models.STAGE7


def test_the_workspaces_shape_is_found_and_status_names_it(wdb, tmp_path):
    assert models.shape() is models.WORKSPACES
    status = cli(worker_env(wdb, redis=False), str(tmp_path), 'status')
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[-1].startswith('beside WhiteNote: workspaces, ')


def a_sqlite_whitenote_without(path, column: str) -> str:
    """Today's SQLite WhiteNote (caae1ff) with one column of "Workspace" left out: no
    WhiteNote this worker knows."""
    schema = ''.join(line for line in open(TODAY_SQL).readlines() if '"%s" ' % column not in line)
    connection = sqlite3.connect(path)
    connection.executescript(schema)
    connection.close()
    return 'sqlite:///%s' % path


def test_a_database_of_no_known_shape_stops_at_start_naming_what_is_missing(tmp_path):
    url = a_sqlite_whitenote_without(tmp_path / 'app.db', 'enableAutoTag')
    missing = 'Workspace.enableAutoTag'
    whitenote_huey.use_database(url)
    try:
        with pytest.raises(models.UnknownShape, match='nearest is today .*needs %s$' % missing):
            models.detect_shape()
    finally:
        whitenote_huey.use_database(os.environ['DATABASE_URL'])
    env = {'DATABASE_URL': url, 'WHITENOTE_SECRET': 's' * 32}
    status = cli(env, str(tmp_path), 'status')
    assert status.returncode == 1 and missing in status.stderr
    consumer = Consumer(env, str(tmp_path)).start()
    try:
        assert consumer.process.wait(60) == 1
    finally:
        consumer.stop()
    assert 'cannot start' in consumer.log() and missing in consumer.log()


# Auto-tag.

def test_auto_tag_follows_the_workspace_switch_and_the_default_workspace(wdb, model):
    user, _ = owner(model)
    on = make_workspace(user, 'On', is_default=True)
    off = make_workspace(user, 'Off', auto_tag=False)
    tagged, untagged = make_ws_message(user, 'in on', on), make_ws_message(user, 'in off', off)
    loose = make_ws_message(user, 'in no workspace: the default one', None)
    assert whitenote_huey.enqueue_message_jobs(user.id, tagged.id) == ['auto-tag']
    assert whitenote_huey.enqueue_message_jobs(user.id, untagged.id) == []
    assert whitenote_huey.enqueue_message_jobs(user.id, loose.id) == ['auto-tag']
    whitenote_huey.auto_tag(user.id, untagged.id)  # as if the switch changed after its enqueue
    drain(whitenote_huey.huey)
    assert tag_names(tagged.id) == tag_names(loose.id) == ['alpha', 'beta']
    assert tag_names(untagged.id) == []
    assert job_state('auto-tag', untagged.id).detail == 'auto-tag is off for this workspace'
    other, _ = owner(model)
    make_workspace(other, 'Quiet', is_default=True, auto_tag=False)
    loose = make_ws_message(other, 'follows a default with auto-tag off', None)
    whitenote_huey.auto_tag(other.id, loose.id)
    drain(whitenote_huey.huey)
    assert tag_names(loose.id) == [] and len(model.chat_requests()) == 2


def test_a_message_with_no_author_is_never_tagged(wdb, model):
    user, _ = owner(model)
    workspace = make_workspace(user, 'Main', is_default=True)
    system = make_ws_message(None, 'written by the system #notag', workspace, later(-600))
    assert whitenote_huey.sweep()['enqueued'] == 0
    assert whitenote_huey.enqueue_message_jobs(user.id, system.id) == []
    whitenote_huey.auto_tag(user.id, system.id)
    drain(whitenote_huey.huey)
    state = job_state('auto-tag', system.id)
    assert (state.status, state.detail) == ('skipped', 'a system message (no author) is never tagged')
    assert model.requests == [] and tag_names(system.id) == []


def test_the_first_shapes_own_briefings_are_not_tagged(db, model):
    user = make_user(config=model_config(model))
    make_message(user, 'yesterday', datetime.datetime.combine(DAY, datetime.time(12)))
    model.respond(text(ANSWER))
    assert whitenote_huey.daily_briefing.call_local(user.id, DAY) == 'done'
    briefing = Message.get(Message.content.startswith(whitenote_huey.BRIEFING_TITLE))  # first shape
    assert whitenote_huey.enqueue_message_jobs(user.id, briefing.id) == ['auto-tag']
    drain(whitenote_huey.huey)
    state = job_state('auto-tag', briefing.id)
    assert (state.status, state.detail) == ('skipped', 'a daily briefing is never tagged')
    whitenote_huey.sweep(now=later(60))
    drain(whitenote_huey.huey)
    assert job_state('auto-tag', briefing.id).status == 'skipped'
    assert tag_names(briefing.id) == ['DailyReview']
    assert not [r for r in model.chat_requests() if whitenote_huey.BRIEFING_TITLE in r.prompt]


# RAGFlow.

def test_each_workspace_syncs_to_its_own_dataset_and_a_move_leaves_one_document(wdb, ragflow):
    user, key = owner(ragflow=ragflow)
    first, second = ragflow.add_dataset(key), ragflow.add_dataset(key)
    a = make_workspace(user, 'A', is_default=True, dataset_id=first, auto_tag=False)
    b = make_workspace(user, 'B', dataset_id=second, auto_tag=False)
    bare = make_workspace(user, 'C', auto_tag=False)
    in_a, in_b, in_bare = (make_ws_message(user, 'note in %s' % w.name, w) for w in (a, b, bare))
    assert whitenote_huey.enqueue_message_jobs(user.id, in_a.id) == ['sync-ragflow']
    assert whitenote_huey.enqueue_message_jobs(user.id, in_b.id) == ['sync-ragflow']
    assert whitenote_huey.enqueue_message_jobs(user.id, in_bare.id) == []
    whitenote_huey.sync_ragflow(user.id, in_bare.id)
    drain(whitenote_huey.huey)
    assert [d['content'] for d in ragflow.documents(first)] == ['note in A']
    assert [d['content'] for d in ragflow.documents(second)] == ['note in B']
    assert job_state('sync-ragflow', in_bare.id).detail == 'RAGFlow is not configured for this workspace'
    assert {r.headers['Authorization'] for r in ragflow.requests} == {'Bearer ' + key}

    move_message(in_a, b)
    whitenote_huey.sync_ragflow(user.id, in_a.id)
    drain(whitenote_huey.huey)
    assert own_docs(ragflow, first, in_a.id) == []
    assert [d['content'] for d in own_docs(ragflow, second, in_a.id)] == ['note in A']
    assert '1 document(s) removed from dataset %s' % first in job_state('sync-ragflow', in_a.id).detail

    move_message(in_b, bare)  # to a workspace with no dataset: nothing of it stays behind
    whitenote_huey.sync_ragflow(user.id, in_b.id)
    drain(whitenote_huey.huey)
    assert own_docs(ragflow, second, in_b.id) == []
    state = job_state('sync-ragflow', in_b.id)
    assert (state.status, state.document_id, state.dataset_id) == ('skipped', None, None)

    Message.delete().where(Message.id == in_a.id).execute()
    assert whitenote_huey.enqueue_message_jobs(user.id, in_a.id) == ['sync-ragflow']
    drain(whitenote_huey.huey)
    assert ragflow.documents(second) == []


TAGGING = {'tags': tags('first', 'second'), 'nothing': tags(), 'failed': error(401, 'bad key')}


def reaches_ragflow_once(model, ragflow, user, dataset: str, message, tagging: str) -> None:
    """With auto-tag on, a new note's sync is enqueued by auto-tag when tagging ends,
    whatever its end: one upload, one parse, with the tags when there are any."""
    model.respond(TAGGING[tagging])
    assert whitenote_huey.enqueue_message_jobs(user.id, message.id) == ['auto-tag', 'sync-ragflow']
    assert [task.name for task in whitenote_huey.huey.pending()] == ['auto_tag']
    drain(whitenote_huey.huey)
    expected = {'tags': '#first #second\n\na new note'}.get(tagging, 'a new note')
    assert job_state('auto-tag', message.id).status == ('failed' if tagging == 'failed' else 'done')
    [upload] = uploads(ragflow)
    assert upload.files[0][1].decode() == expected
    assert [d['content'] for d in own_docs(ragflow, dataset, message.id)] == [expected]
    assert ragflow.count('POST', 'chunks') == 1  # parsed once


@pytest.mark.parametrize('tagging', sorted(TAGGING))
def test_a_new_note_reaches_ragflow_once_after_tagging(db, model, ragflow, tagging):
    config = ragflow_config(ragflow, **model_config(model))
    user = make_user(config=config)
    reaches_ragflow_once(model, ragflow, user, config['ragflow_dataset_id'],
                         make_message(user, 'a new note'), tagging)


@pytest.mark.parametrize('tagging', sorted(TAGGING))
def test_a_new_note_in_a_workspace_reaches_ragflow_once_after_tagging(wdb, model, ragflow, tagging):
    user, key = owner(model, ragflow)
    dataset = ragflow.add_dataset(key)
    message = make_ws_message(user, 'a new note', make_workspace(user, 'W', True, dataset))
    reaches_ragflow_once(model, ragflow, user, dataset, message, tagging)


# Comments.

def test_comments_are_tagged_through_comment_tag_and_kept_in_the_dataset(wdb, model, ragflow):
    user, key = owner(model, ragflow)
    dataset = ragflow.add_dataset(key)
    note = make_ws_message(user, 'a note', make_workspace(user, 'W', True, dataset))
    comment = Comment.create(message=note, author=user, content='a comment on reading')
    bot = Comment.create(message=note, author=None, is_ai_bot=True, content='the bot answers')
    model.default = tags('insight')
    for item in (comment, bot):  # as the web app's jobs: tagging, and the sync after it
        whitenote_huey.auto_tag_comment(user.id, item.id)
    drain(whitenote_huey.huey)
    assert comment_tags(comment.id) == comment_tags(bot.id) == ['insight']
    assert tag_names(note.id) == []
    requests = model.chat_requests()
    assert len(requests) == 2 and {r.headers['authorization'] for r in requests} == {'Bearer ' + model.api_key}
    assert 'the bot answers' in requests[1].prompt  # tagged for the message's author
    for item in (comment, bot):
        [doc] = own_docs(ragflow, dataset, item.id)
        assert doc['name'] == 'message_%s.md' % item.id
        assert doc['content'] == '#insight\n\n' + item.content
    assert len(uploads(ragflow)) == 2

    whitenote_huey.auto_tag_comment(user.id, comment.id)  # same content: no second model call
    drain(whitenote_huey.huey)
    assert len(model.chat_requests()) == 2 and len(uploads(ragflow)) == 2
    Comment.update(content='an edited comment').where(Comment.id == comment.id).execute()
    whitenote_huey.sync_ragflow_comment(user.id, comment.id)
    drain(whitenote_huey.huey)
    assert [d['content'] for d in own_docs(ragflow, dataset, comment.id)] == ['#insight\n\nan edited comment']
    Comment.delete().where(Comment.id == comment.id).execute()
    whitenote_huey.sync_ragflow_comment(user.id, comment.id)
    drain(whitenote_huey.huey)
    assert own_docs(ragflow, dataset, comment.id) == []
    assert job_state('sync-ragflow-comment', comment.id).detail == 'comment deleted, 1 document(s) removed'


def test_a_new_comment_reaches_ragflow_once_though_the_web_app_sends_both_jobs(wdb, model, ragflow):
    user, key = owner(model, ragflow)
    dataset = ragflow.add_dataset(key)
    tagging = make_workspace(user, 'Tagging', True, dataset)
    plain = make_workspace(user, 'Plain', dataset_id=ragflow.add_dataset(key), auto_tag=False)
    comment = Comment.create(message=make_ws_message(user, 'a note', tagging), author=user,
                             content='a new comment')
    for _ in ('auto-tag-comment', 'sync-ragflow'):  # the route enqueues both, side by side
        assert whitenote_huey.enqueue_comment_jobs(user.id, comment.id) == [
            'auto-tag-comment', 'sync-ragflow-comment']
    drain(whitenote_huey.huey)
    assert len(uploads(ragflow)) == 1 and len(model.chat_requests()) == 1
    assert [d['content'] for d in own_docs(ragflow, dataset, comment.id)] == ['#alpha #beta\n\na new comment']
    untagged = Comment.create(message=make_ws_message(user, 'b note', plain), author=user, content='b')
    assert whitenote_huey.enqueue_comment_jobs(user.id, untagged.id) == ['sync-ragflow-comment']
    drain(whitenote_huey.huey)
    assert len(uploads(ragflow)) == 2 and comment_tags(untagged.id) == []


def test_the_sweep_finds_comments_as_it_finds_messages(wdb, model, ragflow):
    user, key = owner(model, ragflow)
    dataset = ragflow.add_dataset(key)
    note = make_ws_message(user, 'a note', make_workspace(user, 'W', True, dataset), later(-3600))
    whitenote_huey.enqueue_message_jobs(user.id, note.id)
    drain(whitenote_huey.huey)
    written = later(-60)  # by the web app, whose enqueue was lost
    comment = Comment.create(id=earlier_id(written), message=note, author=user, content='found',
                             created_at=written)
    counts = whitenote_huey.sweep()
    assert (counts['recent'], counts['enqueued']) == (1, 1)  # auto-tag; the sync follows it
    assert [task.args for task in whitenote_huey.huey.pending()] == [(user.id, comment.id)]
    drain(whitenote_huey.huey)
    assert comment_tags(comment.id) == ['alpha', 'beta']
    assert [d['content'] for d in own_docs(ragflow, dataset, comment.id)] == ['#alpha #beta\n\nfound']
    assert whitenote_huey.sweep()['enqueued'] == 0

    Comment.update(content='edited in SQL').where(Comment.id == comment.id).execute()
    model.default = tags('edited')
    counts = whitenote_huey.sweep(now=later(3 * 86400))  # the rolling scan, past the lookback
    assert counts['comments_scanned'] == 1 and counts['changed'] == 1
    drain(whitenote_huey.huey)
    assert [d['content'] for d in own_docs(ragflow, dataset, comment.id)] == ['#edited\n\nedited in SQL']

    Comment.delete().where(Comment.id == comment.id).execute()
    assert whitenote_huey.sweep()['deleted'] == 1
    drain(whitenote_huey.huey)
    assert own_docs(ragflow, dataset, comment.id) == []


# Briefings.

def briefings(workspace) -> list[Message]:
    ids = [message_id for message_id, in models.database.execute_sql(models.sql(
        'SELECT "id" FROM "Message" WHERE "workspaceId" = ? ORDER BY "createdAt"'), (workspace.id,))]
    return [message for message in map(ws_message, ids)
            if message.content.startswith(whitenote_huey.BRIEFING_TITLE)]


def test_one_briefing_per_workspace_and_day_as_the_web_apps_worker_wrote_it(wdb, model, shanghai):
    user, _ = owner(model, briefingTime='07:30')
    work = make_workspace(user, 'Work', is_default=True)
    home = make_workspace(user, 'Home')
    make_workspace(user, 'Quiet', briefing=False)
    make_ws_message(user, 'work note', work, local(DAY, 10))
    make_ws_message(user, 'loose note', None, local(DAY, 11))  # the default workspace's
    make_ws_message(user, 'home note', home, local(DAY, 12))
    make_ws_message(user, 'home note of the day before', home, local(DAY, 0) - datetime.timedelta(minutes=1))
    model.default = text(ANSWER)
    next_day = DAY + datetime.timedelta(days=1)
    assert whitenote_huey.dispatch_briefings(local(next_day, 7, 29)) == []
    assert sorted(whitenote_huey.dispatch_briefings(local(next_day, 7, 30))) == sorted([work.id, home.id])
    drain(whitenote_huey.huey)
    assert whitenote_huey.dispatch_briefings(local(next_day, 9)) == []  # once per workspace and day
    for workspace, notes in ((work, ['work note', 'loose note']), (home, ['home note'])):
        [briefing] = briefings(workspace)
        assert briefing.content.startswith('# ☀️ 每日晨报 - %s - 2026/11/27\n\n' % workspace.name)
        assert briefing.author_id is None and briefing.is_pinned
        assert [(t.name, t.color) for t in Tag.select().join(models.MessageTag)
                .where(models.MessageTag.message == briefing.id)] == [('DailyReview', '#FFD700')]
        [prompt] = [r.prompt for r in model.chat_requests() if notes[0] in r.prompt]
        assert all(note in prompt for note in notes)
        assert 'of the day before' not in prompt and (workspace is home or 'home note' not in prompt)

    # Only the workspace's own earlier briefings are unpinned.
    make_ws_message(user, 'work again', work, local(next_day, 10))
    assert sorted(whitenote_huey.dispatch_briefings(local(next_day + datetime.timedelta(days=1), 8))) \
        == sorted([work.id, home.id])
    drain(whitenote_huey.huey)
    first, second = briefings(work)
    assert not ws_message(first.id).is_pinned and second.is_pinned
    [home_briefing] = briefings(home)  # no home note that day: no briefing, the last stays pinned
    assert home_briefing.is_pinned


def test_the_briefing_command_makes_each_workspaces_briefing_now(wdb, model, tmp_path):
    alice, _ = owner(model, briefingTime='23:59')
    bob, _ = owner(model)
    work = make_workspace(alice, 'Work', is_default=True)
    home = make_workspace(alice, 'Home')
    bobs = make_workspace(bob, 'Bob', is_default=True)
    noon = datetime.datetime.combine(DAY, datetime.time(12))
    for user, workspace in ((alice, work), (alice, home), (bob, bobs)):
        make_ws_message(user, 'a note in %s' % workspace.name, workspace, noon)
    model.default = text(ANSWER)
    env = worker_env(wdb, redis=False)
    date = (DAY + datetime.timedelta(days=1)).isoformat()
    only = cli(env, str(tmp_path), 'briefing', '--date', date, '--workspace', home.id)
    assert only.returncode == 0, only.stderr
    assert only.stdout.splitlines() == ['briefing of 2026-11-27 for workspace %s: done (done: %s: 1 of 1 '
                                        'message(s) by model gpt-3.5-turbo)'
                                        % (home.id, briefings(home)[0].id)]
    users = cli(env, str(tmp_path), 'briefing', '--date', date, '--user', bob.id)
    assert [line.split(':')[0] for line in users.stdout.splitlines()] == [
        'briefing of 2026-11-27 for workspace %s' % bobs.id]
    every = cli(env, str(tmp_path), 'briefing', '--date', date)
    assert every.returncode == 0, every.stderr
    outcomes = dict(re.findall(r'for workspace (\w+): (\w+)', every.stdout))
    assert outcomes == {work.id: 'done', home.id: 'unchanged', bobs.id: 'unchanged'}
    assert [len(briefings(w)) for w in (work, home, bobs)] == [1, 1, 1]
    missing = cli(env, str(tmp_path), 'briefing', '--date', date, '--workspace', 'no-such-id')
    assert missing.returncode == 1 and 'no workspace' in missing.stderr
