"""The command line as a user runs it, in a subprocess: dates, users, the database file,
status and show, offline tags, the metrics' outcome labels and the offline briefing."""
import datetime
import json
import os
import re
import subprocess
import sys
import urllib.request
from zoneinfo import ZoneInfo

import pytest
from fake_model import FakeModel
from fake_model import error
from services import ROOT
from services import Consumer
from services import cli
from services import drain
from services import free_port
from services import job_state
from services import make_message
from services import make_user
from services import model_config
from services import subprocess_env
from services import wait_for
from services import worker_env

import models
import whitenote_huey
from models import Briefing
from models import JobState
from models import Message
from models import User
from models import utcnow

UTC = datetime.UTC


def today(zone: str = 'UTC') -> datetime.date:
    return datetime.datetime.now(ZoneInfo(zone)).date()


def days_ago(days: int, zone: str = 'UTC') -> datetime.date:
    return today(zone) - datetime.timedelta(days=days)


def noon(day: datetime.date) -> datetime.datetime:
    """Noon UTC of ``day``, as the database holds it."""
    return datetime.datetime.combine(day, datetime.time(12))


def cli_stdin(env: dict, cwd: str, data: bytes, *args: str) -> subprocess.CompletedProcess:
    """``python -m whitenote_huey ARGS`` with ``data`` on its standard input."""
    result = subprocess.run([sys.executable, '-m', 'whitenote_huey', *args], cwd=cwd, input=data,
                            env=subprocess_env(env), capture_output=True, timeout=60)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(),
                                       result.stderr.decode())


def refused(result: subprocess.CompletedProcess, status: int, *words: str) -> None:
    """The command stopped with ``status``, saying ``words`` on stderr, without a traceback."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert 'Traceback' not in result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


@pytest.fixture
def standalone(tmp_path, redis_queue):
    """A standalone SQLite database in a directory of its own, the command line's settings
    for it (with the test's Redis queue), and this process's models bound to it, so that
    drain() runs here the jobs the command line enqueued."""
    url = 'sqlite:///%s/whitenote.db' % tmp_path
    env = {'DATABASE_URL': url, 'REDIS_URL': os.environ['REDIS_URL'],
           'WHITENOTE_SECRET': os.environ['WHITENOTE_SECRET']}
    whitenote_huey.use_database(url)
    yield env
    models.database.close()
    whitenote_huey.use_database(os.environ['DATABASE_URL'])


def add_note(env: dict, cwd, user: str, text: str) -> str:
    result = cli(env, str(cwd), 'note', '--user', user, text)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# 1. Dates

@pytest.mark.parametrize('value, says', [
    ('0001-01-01', 'out of range'), ('0001-01-02', 'out of range'), ('9999-12-31', 'out of range'),
    ('2026-02-30', 'YYYY-MM-DD'), ('yesterday', 'YYYY-MM-DD'),
])
def test_a_refused_briefing_date_is_exit_2_with_a_clear_message(tmp_path, value, says):
    env = {'DATABASE_URL': 'sqlite:///%s/whitenote.db' % tmp_path}
    result = cli(env, str(tmp_path), 'briefing', '--date', value)
    refused(result, 2, 'argument --date', repr(value), says)


def test_a_briefing_date_after_tomorrow_is_refused_saying_the_latest(tmp_path):
    env = {'DATABASE_URL': 'sqlite:///%s/whitenote.db' % tmp_path,
           'WHITENOTE_TIMEZONE': 'Pacific/Kiritimati'}
    tomorrow = today('Pacific/Kiritimati') + datetime.timedelta(days=1)
    after = tomorrow + datetime.timedelta(days=1)
    result = cli(env, str(tmp_path), 'briefing', '--date', after.isoformat())
    refused(result, 2, 'out of range', 'to %s' % tomorrow, 'WHITENOTE_TIMEZONE Pacific/Kiritimati')


@pytest.mark.parametrize('zone', ['Pacific/Kiritimati', 'Etc/GMT+12'])  # UTC+14 and UTC-12
def test_every_accepted_date_gives_a_clean_answer(db, tmp_path, zone):
    user = make_user('edges@example.org', config={})
    note = make_message(user, 'written today #edge')
    env = dict(worker_env(db, redis=False), WHITENOTE_TIMEZONE=zone)
    tomorrow = today(zone) + datetime.timedelta(days=1)
    for since, count in (('0001-01-02', 1), ('9999-12-30', 0)):
        retag = cli(env, str(tmp_path), 'retag', '--since', since, '--user', user.email)
        assert retag.returncode == 0, retag.stderr
        assert 'enqueued auto-tag for %d message(s)' % count in retag.stdout
    assert job_state('auto-tag', note.id).status == 'pending'
    first = cli(env, str(tmp_path), 'briefing', '--user', user.email, '--date', '0001-01-03')
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith('briefing of 0001-01-02 for user %s: empty' % user.id)
    latest = cli(env, str(tmp_path), 'briefing', '--user', user.id, '--date', tomorrow.isoformat())
    assert latest.returncode == 0, latest.stderr
    assert 'briefing of %s for user %s: done' % (today(zone), user.id) in latest.stdout
    too_early = cli(env, str(tmp_path), 'retag', '--since', '0001-01-01', '--all')
    refused(too_early, 2, 'argument --since', 'out of range')


# 2. Users, messages and numbers

def test_every_user_option_takes_an_id_or_an_email(db, tmp_path):
    ann = make_user('Ann@Example.org', config={})
    bob = make_user('bob@example.org', config={})
    make_message(ann, 'note by ann', noon(days_ago(1)))
    make_message(bob, 'note by bob', noon(days_ago(1)))
    env = worker_env(db, redis=False)
    for value in (ann.id, 'Ann@Example.org', 'ann@example.ORG'):
        retag = cli(env, str(tmp_path), 'retag', '--user', value)
        assert retag.returncode == 0 and 'for 1 message(s)' in retag.stdout, retag.stderr
    briefing = cli(env, str(tmp_path), 'briefing', '--user', 'bob@example.org')
    assert briefing.returncode == 0, briefing.stderr
    [line] = briefing.stdout.splitlines()
    assert line.startswith('briefing of %s for user %s: done' % (days_ago(1), bob.id))
    assert Briefing.get(Briefing.user_id == bob.id).status == 'done'
    assert not Briefing.select().where(Briefing.user_id == ann.id).exists()


def test_unknown_users_and_messages_are_exit_1_with_a_message(db, tmp_path):
    user = make_user('known@example.org', config={})
    message = make_message(user, 'here')
    gone = make_message(user, 'deleted since')
    JobState.create(kind='auto-tag', message_id=gone.id, user_id=user.id, status='failed')
    gone.delete_instance()
    env = worker_env(db, redis=False)
    cwd = str(tmp_path)
    refused(cli(env, cwd, 'retag', '--user', 'nobody@example.org'), 1,
            "no user with id or email 'nobody@example.org'")
    refused(cli(env, cwd, 'briefing', '--user', 'no-such-id'), 1,
            "no user with id or email 'no-such-id'")
    refused(cli(env, cwd, 'cleanup-versions', '--message', 'no-such-id'), 1,
            "no message with id 'no-such-id'")
    refused(cli(env, cwd, 'retry', '--message', 'no-such-id'), 1, "no message with id 'no-such-id'")
    refused(cli(env, cwd, 'show', 'no-such-id'), 1, "no message with id 'no-such-id'")
    # Known ones go through, a deleted message's job record included.
    assert cli(env, cwd, 'cleanup-versions', '--message', message.id).returncode == 0
    retry = cli(env, cwd, 'retry', '--message', gone.id)
    assert retry.returncode == 0 and 'enqueued 1 failed job(s)' in retry.stdout, retry.stderr


@pytest.mark.parametrize('args, says', [
    (('sweep', '--limit', '-5'), 'argument --limit'),
    (('sweep', '--limit', 'many'), 'argument --limit'),
    (('status', '--failures', '-1'), 'argument --failures'),
    (('retag', '--user', ''), 'argument --user'),
    (('briefing', '--user', '  '), 'argument --user'),
])
def test_bad_numbers_and_blank_users_are_exit_2(db, tmp_path, args, says):
    refused(cli(worker_env(db, redis=False), str(tmp_path), *args), 2, says)
    assert not (tmp_path / 'whitenote-queue.db').exists()  # nothing was enqueued


def test_note_refuses_a_blank_user_and_reads_standard_input(standalone, tmp_path):
    for user in ('', '   '):
        refused(cli(standalone, str(tmp_path), 'note', '--user', user, 'text'), 2, 'argument --user')
    refused(cli(standalone, str(tmp_path), 'note', '--user', 'no-email', 'text'), 1,
            "no user with id or email 'no-email'", 'email')
    assert not User.select().exists() and not Message.select().exists()
    # Longer than the system lets one argument be (128 KiB on Linux).
    long_text = 'A long note #stdin\n' + 'word ' * 60_000
    piped = cli_stdin(standalone, str(tmp_path), long_text.encode() + b'\n', 'note', '--user',
                      'Piped@Example.org', '-')
    assert piped.returncode == 0, piped.stderr
    message = Message.get_by_id(piped.stdout.strip())
    assert message.content == long_text.rstrip()
    # The same user again, by another spelling of the email and by id.
    again = cli_stdin(standalone, str(tmp_path), '第二条 #读书'.encode(), 'note', '--user',
                      'piped@example.org', '-')
    by_id = cli(standalone, str(tmp_path), 'note', '--user', message.author_id, 'third')
    assert again.returncode == 0 and by_id.returncode == 0, again.stderr + by_id.stderr
    assert [user.email for user in User.select()] == ['Piped@Example.org']
    assert Message.get_by_id(again.stdout.strip()).content == '第二条 #读书'
    refused(cli_stdin(standalone, str(tmp_path), b'\xff\xfe broken', 'note', '--user',
                      'piped@example.org', '-'), 2, 'not UTF-8')
    refused(cli_stdin(standalone, str(tmp_path), b' \n\n', 'note', '--user',
                      'piped@example.org', '-'), 2, 'the text is empty')
    assert Message.select().count() == 3


# 3. The wrong directory

READING_COMMANDS = [('show', 'cmx0wzwgm36ln1bmy0msl44dw'), ('status',), ('status', '--json'),
                    ('sweep',), ('retag', '--all'), ('retry',), ('briefing',),
                    ('enqueue', 'auto-tag', 'cmx0wzwgm36ln1bmy0msl44dw'), ('cleanup-versions',)]


def test_commands_that_read_refuse_a_database_file_that_is_not_there(tmp_path):
    """Run from another directory: nothing is made there, and the error names the file."""
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    runs = [('sqlite:///whitenote.db', elsewhere / 'whitenote.db', args) for args in READING_COMMANDS]
    runs.append(('sqlite:///data/notes.db', elsewhere / 'data' / 'notes.db', ('status',)))
    for url, path, args in runs:
        env = {'DATABASE_URL': url, 'WHITENOTE_SECRET': ''}  # no secret: it would be a file
        result = cli(env, str(elsewhere), *args)
        refused(result, 1, 'no database at %s' % path, 'DATABASE_URL %s' % url, 'init-db')
        assert os.listdir(elsewhere) == [], args  # no database, queue or key file made


def test_only_note_and_init_db_make_the_database(tmp_path):
    env = {'DATABASE_URL': 'sqlite:///whitenote.db', 'WHITENOTE_SECRET': ''}
    for command in (('init-db',), ('note', '--user', 'me@example.org', 'first #note')):
        directory = tmp_path / command[0]
        directory.mkdir()
        result = cli(env, str(directory), *command)
        assert result.returncode == 0, result.stderr
        assert (directory / 'whitenote.db').exists()
        status = cli(env, str(directory), 'status', '--json')
        assert status.returncode == 0, status.stderr
    shown = cli(env, str(tmp_path / 'note'), 'show', result.stdout.strip())
    assert shown.returncode == 0 and '  first #note' in shown.stdout.splitlines(), shown.stderr


# 4. status and show

@pytest.mark.usefixtures('redis_queue')
def test_status_shows_the_last_dispatch_and_the_briefings_of_recent_days(db, model, tmp_path):
    yesterday, before = days_ago(1), days_ago(2)
    made = make_user('made@example.org', config={})
    make_user('quiet@example.org', config={})  # no notes: empty
    broken = make_user('broken@example.org',
                       config={**model_config(model), 'openai_api_key': 'sk-wrong-key-7777'})
    for user in (made, broken):
        make_message(user, 'a note of yesterday', noon(yesterday))
    env = worker_env(db, redis=True)
    cwd = str(tmp_path)
    first = cli(env, cwd, 'briefing')  # yesterday's
    assert first.returncode == 1, first.stderr  # one failed
    assert cli(env, cwd, 'briefing', '--date', yesterday.isoformat()).returncode == 0
    never = cli(env, cwd, 'status', '--json')
    assert json.loads(never.stdout)['briefings']['last_dispatch'] is None
    assert cli(env, cwd, 'sweep').returncode == 0  # dispatches what is due, recorded
    result = cli(env, cwd, 'status', '--json')
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    briefings = report['briefings']
    assert set(briefings) == {'enabled', 'last_dispatch', 'days'} and briefings['enabled'] is True
    last = briefings['last_dispatch']
    assert (last['outcome'], last['day'], last['enqueued']) == ('done', yesterday.isoformat(), 0)
    assert last['started_at'].endswith('Z') and last['finished_at'] >= last['started_at']
    counts = {'done': 0, 'empty': 0, 'failed': 0, 'skipped': 0, 'pending': 0, 'running': 0,
              'other': 0}
    assert briefings['days'] == [
        dict(counts, day=yesterday.isoformat(), done=1, empty=1, failed=1),
        dict(counts, day=before.isoformat(), empty=3),
    ]
    [failure] = report['failures']
    assert failure['kind'] == 'daily-briefing' and failure['message_id'] is None
    assert (failure['day'], failure['user_id'], failure['attempts']) == (
        yesterday.isoformat(), broken.id, 1)
    assert 'HTTP 401' in failure['error'] and 'sk-wrong-key-7777' not in result.stdout
    text = cli(env, cwd, 'status')
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert any(line.startswith('briefings: last dispatch ') and 'for the day %s: 0 enqueued'
               % yesterday in line for line in lines)
    assert any(line.split() == [yesterday.isoformat(), '1', '1', '1', '0', '0', '0']
               for line in lines)
    assert any('daily-briefing' in line and 'day %s, user %s' % (yesterday, broken.id) in line
               and 'HTTP 401' in line for line in lines)
    assert any(line.startswith('  briefings: done;') for line in lines)  # among the periodic runs


def test_show_says_a_briefing_is_one_of_which_day_and_for_whom(db, tmp_path):
    yesterday = days_ago(1)
    user = make_user('reader@example.org', config={})
    make_message(user, 'read a book', noon(yesterday))
    older = make_message(user, '# ☀️ 每日晨报 - 2024/1/5\n\nmade by the web app long ago')
    env = worker_env(db, redis=False)
    assert cli(env, str(tmp_path), 'briefing', '--user', user.email).returncode == 0
    made = Briefing.get((Briefing.user_id == user.id) & (Briefing.day == yesterday))
    shown = cli(env, str(tmp_path), 'show', made.message_id)
    assert shown.returncode == 0, shown.stderr
    assert ('briefing: the daily briefing of %s for reader@example.org, made by the worker '
            '(1 of 1 message(s) by offline (no model key))' % yesterday) in shown.stdout.splitlines()
    assert 'none has run yet' not in shown.stdout
    by_title = cli(env, str(tmp_path), 'show', older.id)
    assert ('briefing: the daily briefing of 2024-01-05 for reader@example.org, known by its '
            'title (the worker has no record of making it)') in by_title.stdout.splitlines()
    plain = cli(env, str(tmp_path), 'show', Message.get(Message.content == 'read a book').id)
    assert 'briefing' not in plain.stdout and 'none has run yet' in plain.stdout


# 5. Offline tags

@pytest.mark.parametrize('content, known, found', [
    ('Sent an email about it', ['ai'], []),
    ('Going to write pythonic code', ['go', 'python'], []),
    ('ago, cargo, python3, python_x', ['go', 'python'], []),
    ('AI is fun: go, write Python!', ['ai', 'go', 'python'], ['ai', 'go', 'python']),
    ('学习python编程', ['python'], ['python']),
    ('今天的读书笔记', ['读书'], ['读书']),
    ('学AI绘画', ['AI绘画'], ['AI绘画']),
    ('email绘画', ['AI绘画'], []),
    ('パイソンを勉強した', ['パイソン'], ['パイソン']),
    ('파이썬을 배웠다', ['파이썬'], ['파이썬']),
    ('ＰＹＴＨＯＮ and Straße', ['python', 'STRASSE'], ['python', 'STRASSE']),
    ('my c++ code, not objc++', ['c++'], ['c++']),
    ('objc++ only', ['c++'], []),
    ('café au lait', ['caf'], []),
    ('Привет, мир', ['мир', 'при'], ['мир']),
])
def test_offline_tagger_matches_whole_words_and_whole_cjk_names(content, known, found):
    assert whitenote_huey.offline_tags(content, known) == found


def test_offline_tags_of_notes_written_on_the_command_line(standalone, tmp_path):
    def note_and_tags(text: str) -> str:
        message_id = add_note(standalone, tmp_path, 'me@example.org', text)
        drain(whitenote_huey.huey)
        shown = cli(standalone, str(tmp_path), 'show', message_id)
        assert shown.returncode == 0, shown.stderr
        return next(line for line in shown.stdout.splitlines() if line.startswith('tags: '))

    assert note_and_tags('Learning #ai #go #python #读书') == 'tags: #ai, #go, #python'
    assert note_and_tags('Starting #读书 club') == 'tags: #读书'
    assert note_and_tags('Sent an email. Going to write pythonic code.') == 'tags: none'
    assert note_and_tags('学习python编程，今天的读书笔记') == 'tags: #python, #读书'
    assert note_and_tags('AI helps; go on.') == 'tags: #ai, #go'


# 6. Metrics

def scrape_outcomes(port: int) -> dict[tuple[str, str], float] | None:
    """The whitenote_jobs_total samples a consumer serves, by (kind, outcome)."""
    try:
        with urllib.request.urlopen('http://127.0.0.1:%d/metrics' % port, timeout=10) as response:
            page = response.read().decode()
    except OSError:
        return None
    samples = re.findall(r'^whitenote_jobs_total\{kind="([^"]*)",outcome="([^"]*)"\} (\S+)$', page,
                         re.MULTILINE)
    return {(kind, outcome): float(value) for kind, outcome, value in samples}


def readme_outcomes() -> list[str]:
    """The outcome values the README's metrics section lists."""
    readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    line = next(line for line in readme.splitlines() if line.startswith('| `whitenote_jobs_total'))
    return re.findall(r'`(\w+)`', line.split('|')[3])


@pytest.mark.parametrize('db', ['sqlite'], indirect=True)  # labels do not depend on the database
@pytest.mark.usefixtures('redis_queue')
def test_outcome_labels_come_from_a_fixed_set(db, tmp_path):
    port = free_port()
    with FakeModel(api_key='sk-metrics-key-0001') as model:
        user = make_user(config=model_config(model, enable_briefing=False))
        off = make_user(config=model_config(model, enable_auto_tag=False, enable_briefing=False))
        wrong = make_user(config={**model_config(model, enable_briefing=False),
                                  'openai_api_key': 'sk-wrong-0001'})
        make_user(config=model_config(model, briefing_time='00:00'))  # no notes: empty
        held = make_message(user, 'held')
        # Another live run holds "held": a run that comes meanwhile defers.
        JobState.create(kind='auto-tag', message_id=held.id, user_id=user.id, status='running',
                        attempts=1, lease_until=utcnow() + datetime.timedelta(hours=1))
        consumer = Consumer(dict(worker_env(db, redis=True), METRICS_PORT=str(port)),
                            str(tmp_path)).start()
        try:
            def ran(outcome: str, kind: str = 'auto-tag') -> bool:
                return (scrape_outcomes(port) or {}).get((kind, outcome), 0) >= 1

            # Each message is made just before its job, so no sweep pass enqueues it first.
            first = make_message(user, 'first')
            for author, message, outcome in (
                    (user, first, 'done'), (user, first, 'unchanged'),
                    (off, make_message(off, 'x'), 'skipped'),
                    (wrong, make_message(wrong, 'y'), 'failed')):
                whitenote_huey.auto_tag(author.id, message.id)
                wait_for(lambda outcome=outcome: ran(outcome), what='an auto-tag ' + outcome)
            (JobState  # the holder still runs for 3 seconds
             .update(lease_until=utcnow() + datetime.timedelta(seconds=3))
             .where(JobState.message_id == held.id)
             .execute())
            whitenote_huey.auto_tag(user.id, held.id)
            wait_for(lambda: ran('deferred'), what='an auto-tag deferred')
            model.respond(error(503, 'busy'))
            busy = make_message(user, 'busy')
            whitenote_huey.auto_tag(user.id, busy.id)
            for message in (busy, held):
                wait_for(lambda message=message: getattr(job_state('auto-tag', message.id), 'status',
                                                         None) == 'done', what='the job to be done')
            wait_for(lambda: ran('empty', 'daily-briefing'), what='the empty briefing')
            outcomes = scrape_outcomes(port)
        finally:
            consumer.stop()
    # Every outcome but 'lost', which needs a run paused past its lease (tests/test_leases.py).
    assert {outcome for _, outcome in outcomes} == set(whitenote_huey.JOB_OUTCOMES) - {'lost'}
    assert readme_outcomes() == list(whitenote_huey.JOB_OUTCOMES)
    assert outcomes[('auto-tag', 'retrying')] == 1 and outcomes[('auto-tag', 'deferred')] >= 1
    assert {kind for kind, _ in outcomes} == {'auto-tag', 'daily-briefing'}
    deferred = [line for line in consumer.log().splitlines() if held.id + ' deferred' in line]
    assert deferred and re.search(r'deferred in [\d.]+s: runs again in \d+\.\ds \(another run '
                                  r'holds the message\)$', deferred[0]), deferred


# 7. The offline briefing, in Chinese

def test_offline_briefing_is_in_chinese_throughout(standalone, tmp_path):
    python = add_note(standalone, tmp_path, 'me@example.org', 'Reading about #python decorators')
    reading = add_note(standalone, tmp_path, 'me@example.org', '今天的读书笔记 #读书')
    drain(whitenote_huey.huey)
    tomorrow = (today() + datetime.timedelta(days=1)).isoformat()
    made = cli(standalone, str(tmp_path), 'briefing', '--date', tomorrow)
    assert made.returncode == 0 and ': done (done: ' in made.stdout, made.stderr
    briefing = Message.get_by_id(Briefing.get(Briefing.day == today()).message_id)
    times = {message_id: Message.get_by_id(message_id).created_at.strftime('%H:%M')
             for message_id in (python, reading)}
    assert briefing.content.splitlines() == [
        '# ☀️ 每日晨报 - %d/%d/%d' % (today().year, today().month, today().day),
        '',
        '📝 昨日回顾：共 2 条笔记',
        '',
        '- %s Reading about #python decorators' % times[python],
        '- %s 今天的读书笔记 #读书' % times[reading],
        '',
        '🏷️ 常用标签：#python（1 条）、#读书（1 条）',
        '',
        '*未配置 AI 模型的 API 密钥，本晨报为离线生成。*',
        '',
        '---',
        '*涵盖当天 2 条笔记中的 2 条*',
    ]
    shown = cli(standalone, str(tmp_path), 'show', briefing.id)
    assert '  📝 昨日回顾：共 2 条笔记' in shown.stdout.splitlines()
