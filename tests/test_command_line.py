"""The command line as a user runs it, in a subprocess: dates, users, the database file,
status and show, offline tags, the metrics' outcome labels and the offline briefing."""
import datetime
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
    assert {outcome for _, outcome in outcomes} == set(whitenote_huey.JOB_OUTCOMES)
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
