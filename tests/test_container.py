"""The container: the Dockerfile runs the README's own install and run commands (and this
test runs them too, on a clean copy, so CI covers the image's steps), and the compose
service replaces WhiteNote's worker with the same environment variables and volumes."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time

import yaml
from services import ROOT
from services import wait_for

HERE = os.path.dirname(os.path.abspath(__file__))


def readme_setup_command() -> str:
    """The README's one command that installs and runs the worker on embedded defaults."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    commands = re.findall(r'^    (python3 -m venv .* && \./run_consumer\.sh)$', text, re.MULTILINE)
    assert len(commands) == 1, commands
    return commands[0]


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, (KEYWORD, arguments), continuation lines joined."""
    text = open(os.path.join(ROOT, 'Dockerfile')).read().replace('\\\n', ' ')
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith('#')]


def test_the_dockerfile_runs_the_readmes_own_commands():
    steps = dockerfile()
    install, run = readme_setup_command().rsplit(' && ', 1)
    assert re.fullmatch(r'python:3\.\d+-slim', steps[0][1]), steps[0]
    assert ('RUN', install) in steps
    assert steps[-1] == ('CMD', json.dumps([run]))
    user = [value for keyword, value in steps if keyword == 'USER']
    assert user and user[-1] not in ('root', '0')
    assert steps.index(('USER', user[-1])) < steps.index(('RUN', install))  # installed as that user too
    # docker stop sends SIGTERM; run_consumer.sh makes it a graceful stop, through exec.
    assert ('STOPSIGNAL', 'SIGTERM') in steps
    script = open(os.path.join(ROOT, 'run_consumer.sh')).read()
    assert '--graceful-signal TERM' in script and re.search(r'^exec ', script, re.MULTILINE)
    ignored = open(os.path.join(ROOT, '.dockerignore')).read().split()
    assert {'.env', '.whitenote-secret', '.venv/', '*.db'} <= set(ignored)


def test_the_readmes_install_and_run_commands_work_on_a_clean_copy(tmp_path):
    """What the image does, done here: the README's install in a fresh copy of the
    project, then ./run_consumer.sh, stopped with SIGTERM as docker stop does."""
    copy = tmp_path / 'whitenote-huey'
    listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split('\0')
    for name in filter(None, listed):
        if os.path.exists(os.path.join(ROOT, name)):
            os.makedirs(copy / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), copy / name)
    install, run = readme_setup_command().rsplit(' && ', 1)
    env = {key: value for key, value in os.environ.items()
           if key not in ('DATABASE_URL', 'REDIS_URL', 'PYTHONPATH', 'VIRTUAL_ENV')}
    env['PATH'] = os.pathsep.join(p for p in env['PATH'].split(os.pathsep)
                                  if not p.startswith(os.path.dirname(os.path.dirname(ROOT + '/.venv/'))))
    installed = subprocess.run(['sh', '-c', install], cwd=copy, env=env, capture_output=True, text=True,
                               timeout=900)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    assert (copy / '.venv' / 'bin' / 'huey_consumer').exists()
    log_path = tmp_path / 'worker.log'
    with open(log_path, 'wb') as log:
        process = subprocess.Popen(shlex.split(run), cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: '[sweep] start-up pass' in log_path.read_text(), timeout=60, what='the worker to start')
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert 'Shutting down gracefully' in log_path.read_text()


def test_the_compose_service_replaces_whitenotes_worker():
    upstream = json.load(open(os.path.join(HERE, 'webapp-worker-service.json')))
    compose = yaml.safe_load(open(os.path.join(ROOT, 'deploy', 'docker-compose.whitenote.yml')))
    worker = compose['services']['worker']
    assert list(compose['services']) == ['worker']
    environment = set(worker['environment'])
    assert environment >= set(upstream['environment'])
    assert worker['volumes'] == upstream['volumes']
    assert worker['build']['dockerfile'] == 'Dockerfile' and worker['container_name'] == 'whitenote-worker'
    # Every setting it adds is one of the worker's own, documented in .env.example.
    documented = set(re.findall(r'^# ?([A-Z][A-Z0-9_]+)=', open(os.path.join(ROOT, '.env.example')).read(),
                                re.MULTILINE))
    assert environment - set(upstream['environment']) <= documented, environment - documented
    # docker compose stop waits past SHUTDOWN_TIMEOUT's 60 s before it kills.
    assert int(worker['stop_grace_period'].rstrip('s')) > 60
