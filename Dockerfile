# whitenote-huey, WhiteNote's background worker, as a container: it takes the web app's
# BullMQ jobs in place of WhiteNote's own worker (deploy/docker-compose.whitenote.yml).
#
# It runs the README's own set-up commands, so what CI runs covers this image: the install
# (python3 -m venv .venv && . .venv/bin/activate && pip install .) and ./run_consumer.sh.
# Settings come from the environment (or a .env mounted at /app/.env, or WHITENOTE_ENV_FILE).
# `docker stop` sends SIGTERM, which run_consumer.sh makes a graceful stop: running jobs get
# SHUTDOWN_TIMEOUT seconds (default 60), so give it more: docker stop -t 70.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin whitenote \
    && mkdir -p /app/data/uploads /app/data/link_md \
    && chown -R whitenote:whitenote /app
WORKDIR /app
COPY --chown=whitenote:whitenote . /app
USER whitenote

RUN python3 -m venv .venv && . .venv/bin/activate && pip install .

STOPSIGNAL SIGTERM
CMD ["./run_consumer.sh"]
