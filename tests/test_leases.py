"""A run that lost its lease writes nothing; documents are always found; a job that kills
its consumer is not run for ever.

A worker paused past its lease (SIGSTOP here; a long GC pause or a network partition
alike) is the real consumer stopped and continued around a short JOB_LEASE_SECONDS,
while another run takes its job over.  "Nothing written" is checked on the database and
on the fake RAGFlow.
"""
import datetime
import os
import signal
import threading

import pytest
from fake_model import error
from fake_model import tags
from fake_model import text
from services import Consumer
from services import drain
from services import job_state
from services import make_message
from services import make_user
from services import model_config
from services import ragflow_config
from services import tag_names
from services import wait_for
from services import worker_env

import models
import whitenote_huey
from models import Briefing
from models import Message

POSTGRESQL_ONLY = pytest.mark.parametrize('db', ['postgresql'], indirect=True)
LEASE = 2  # JOB_LEASE_SECONDS of the consumers here


@pytest.fixture
def consumers(db, redis_queue, tmp_path):
    """Start consumers (-n: no periodic task) on this test's database and queue, with a
    short lease and a long HTTP_TIMEOUT (a paused call must not end by its deadline);
    any left running when the test ends is continued and killed."""
    started = []
    env = dict(worker_env(db, redis=True), JOB_LEASE_SECONDS=str(LEASE), HTTP_TIMEOUT='60')

    def start(name: str, **extra) -> Consumer:
        consumer = Consumer(dict(env, **extra), str(tmp_path), '-w', '2', '-k', 'thread', '-n',
                            log_path=str(tmp_path / ('%s.log' % name))).start()
        started.append(consumer)
        wait_for(lambda: '[sweep] start-up pass' in consumer.log(), what='%s to start' % name)
        return consumer
    yield start
    for consumer in started:
        if consumer.process.poll() is None:
            os.kill(consumer.process.pid, signal.SIGCONT)
        consumer.stop(signal.SIGKILL)


def lease_ran_out(kind: str, message_id: str) -> bool:
    state = job_state(kind, message_id)
    return state is not None and state.status == 'running' and state.lease_until < models.utcnow()


# 4. A run that lost its lease writes nothing.

@POSTGRESQL_ONLY
def test_a_sync_paused_past_its_lease_deletes_and_records_nothing_of_the_run_that_took_over(
        consumers, ragflow):
    config = ragflow_config(ragflow, enable_auto_tag=False)
    dataset = config['ragflow_dataset_id']
    user = make_user(config=config)
    paused = consumers('paused')
    message = make_message(user, 'synced twice at once')
    # The paused run's upload is stored, and answered, 12 s after it arrives: after the
    # other run has listed the message's documents.
    ragflow.fail_next('slow', method='POST', path_contains='/documents', seconds=12)
    whitenote_huey.sync_ragflow(user.id, message.id)
    wait_for(lambda: ragflow.count('POST', '/documents') == 1, what='the upload to be sent')
    os.kill(paused.process.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: lease_ran_out('sync-ragflow', message.id), what='its lease to run out')
        other = consumers('other')  # its start-up sweep takes the lost run up
        wait_for(lambda: job_state('sync-ragflow', message.id).status == 'done', what='the other run')
        taken_over = job_state('sync-ragflow', message.id)
        wait_for(lambda: len(ragflow.documents(dataset)) == 2, what='the paused upload to land')
    finally:
        os.kill(paused.process.pid, signal.SIGCONT)
    wait_for(lambda: 'stopped after' in paused.log(), what='the paused run to stop')
    state = job_state('sync-ragflow', message.id)
    assert (state.status, state.document_id, state.owner) == ('done', taken_over.document_id, taken_over.owner)
    # The other run's document stays; the paused run deleted only its own upload.
    assert [(doc['id'], doc['content']) for doc in ragflow.documents(dataset)] == [
        (taken_over.document_id, 'synced twice at once')]
    assert 'nothing written: sync-ragflow %s: taken over by another run' % message.id in paused.log()
    assert other.process.poll() is None and paused.process.poll() is None


@POSTGRESQL_ONLY
def test_an_auto_tag_paused_past_its_lease_leaves_the_tags_of_the_run_that_took_over(consumers, model):
    user = make_user(config=model_config(model))
    release = threading.Event()

    def answer(request):
        if len(model.chat_requests()) == 1:
            release.wait(60)
            return tags('paused-tag')
        return tags('other-tag')

    model.default = answer
    paused = consumers('paused')
    message = make_message(user, 'tagged twice at once')
    whitenote_huey.auto_tag(user.id, message.id)
    wait_for(lambda: model.chat_requests(), what='the paused run to ask the model')
    os.kill(paused.process.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: lease_ran_out('auto-tag', message.id), what='its lease to run out')
        consumers('other')
        wait_for(lambda: tag_names(message.id) == ['other-tag'], what='the other run')
        taken_over = job_state('auto-tag', message.id)
        release.set()  # the paused run's answer waits in its socket
    finally:
        os.kill(paused.process.pid, signal.SIGCONT)
    wait_for(lambda: 'stopped after' in paused.log(), what='the paused run to stop')
    state = job_state('auto-tag', message.id)
    assert tag_names(message.id) == ['other-tag']
    assert (state.status, state.owner, state.tags_added) == ('done', taken_over.owner, taken_over.tags_added)
    assert len(model.chat_requests()) == 2


DAY = datetime.date(2025, 6, 1)


def day_row(user) -> Briefing:
    return Briefing.get((Briefing.user_id == user.id) & (Briefing.day == DAY))


@POSTGRESQL_ONLY
def test_a_briefing_whose_taking_over_run_failed_is_made_once_by_the_paused_run(consumers, model):
    user = make_user(config=model_config(model, enable_auto_tag=False))  # the model is the briefing's
    make_message(user, 'a note of the day', datetime.datetime(2025, 6, 1, 12))
    release = threading.Event()

    def answer(request):
        if len(model.chat_requests()) == 1:
            release.wait(60)
            return text('from the paused run')
        return error(401, 'the key was revoked meanwhile')

    model.default = answer
    paused = consumers('paused')
    whitenote_huey.daily_briefing(user.id, DAY)
    wait_for(lambda: model.chat_requests(), what='the paused run to ask the model')
    os.kill(paused.process.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: day_row(user).lease_until < models.utcnow(),
                 what='its lease to run out')
        with pytest.raises(whitenote_huey.JobFailed, match='HTTP 401'):
            whitenote_huey.daily_briefing.call_local(user.id, DAY)  # takes the day over, and fails
        assert day_row(user).status == 'failed'
        release.set()
    finally:
        os.kill(paused.process.pid, signal.SIGCONT)
    wait_for(lambda: day_row(user).status == 'done', what='the paused run')
    row = day_row(user)
    [briefing] = (Message
                  .select()
                  .where((Message.author == user.id)
                         & Message.content.startswith(whitenote_huey.BRIEFING_TITLE)))
    assert 'from the paused run' in briefing.content and row.message_id == briefing.id
    assert row.last_error is None and row.attempts == 3  # claimed, taken over, taken back
    assert 'did not make it; this run, whose lease had run out, makes it' in paused.log()
    assert whitenote_huey.daily_briefing.call_local(user.id, DAY) == 'unchanged'  # made once


# 5. Deleted notes leave RAGFlow.

@pytest.mark.usefixtures('db', 'redis_queue')
@pytest.mark.parametrize('failure', ['parse-refused', 'upload-answer-lost'])
def test_documents_of_a_failed_sync_are_removed_once_the_message_is_deleted(ragflow, failure):
    config = ragflow_config(ragflow, enable_auto_tag=False)
    dataset = config['ragflow_dataset_id']
    user = make_user(config=config)
    message = make_message(user, 'to be deleted later')
    if failure == 'parse-refused':  # the upload answered, then the parse a 401
        ragflow.fail_next('http401', path_contains='/chunks')
    else:  # every upload stored, its answer lost
        ragflow.fail_next('drop_after_store', times=4, method='POST', path_contains='/documents')
    whitenote_huey.sync_ragflow(user.id, message.id)
    drain(whitenote_huey.huey)
    state = job_state('sync-ragflow', message.id)
    assert state.status == 'failed' and state.dataset_id == dataset
    stored = ragflow.documents(dataset)
    assert len(stored) == (1 if failure == 'parse-refused' else 4)
    if failure == 'parse-refused':
        assert state.document_id == stored[0]['id']  # recorded as soon as the upload answered
    message.delete_instance()
    counts = whitenote_huey.sweep()
    assert counts['deleted'] == 1
    drain(whitenote_huey.huey)
    assert ragflow.documents(dataset) == []
    state = job_state('sync-ragflow', message.id)
    assert (state.status, state.document_id, state.dataset_id) == ('done', None, None)
    assert whitenote_huey.sweep()['deleted'] == 0  # nothing left to look for


# 6. A job that kills its consumer is not retried for ever.

@POSTGRESQL_ONLY
def test_a_job_whose_runs_die_with_their_consumer_is_failed_after_a_bounded_number(consumers, model):
    user = make_user(config=model_config(model))
    model.default = tags('never', delay=60)  # a run is under way until its consumer dies
    message = make_message(user, 'kills its consumer')
    whitenote_huey.auto_tag(user.id, message.id)
    runs = 0
    while True:
        consumer = consumers('run%d' % runs)
        wait_for(lambda runs=runs: len(model.chat_requests()) > runs
                 or getattr(job_state('auto-tag', message.id), 'status', '') == 'failed',
                 what='the run to reach the model, or the job to be failed')
        if job_state('auto-tag', message.id).status == 'failed':
            break
        runs += 1
        consumer.stop(signal.SIGKILL)  # killed mid-run, as for memory
        wait_for(lambda: lease_ran_out('auto-tag', message.id), what='its lease to run out')
        assert runs <= 5, 'taken up again without end'
    state = job_state('auto-tag', message.id)
    limit = 3  # JOB_MAX_LOST_RUNS, the default
    assert runs == limit + 1 and len(model.chat_requests()) == runs
    assert state.status == 'failed' and state.lost_runs == 0
    assert ('not run again: 4 run(s) of this job died with their worker (killed, out of memory?) before '
            'they could record an outcome, more than JOB_MAX_LOST_RUNS (3)') in state.last_error
