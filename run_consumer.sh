#!/bin/sh
# Run the whitenote-huey consumer; what systemd starts.
#
# Works from any working directory: .env and the embedded whitenote.db are read from
# the working directory (systemd's WorkingDirectory), the code from where it is
# installed, or from beside this script.  SIGTERM (systemd's stop) lets running jobs
# finish before exit; SHUTDOWN_TIMEOUT bounds the wait.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
if [ -x "$here/.venv/bin/huey_consumer" ]; then
    PATH="$here/.venv/bin:$PATH"
fi
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
# glibc gives each thread that allocates a memory arena of its own; two are plenty for
# threads that take turns on the GIL, and keep the consumer's memory a few MB smaller.
MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}"
export PATH PYTHONPATH MALLOC_ARENA_MAX

consumer=huey_consumer
if [ "${WORKER_TYPE:-thread}" = greenlet ]; then
    # Greenlets need gevent's patches in place before anything else is imported
    # (install with: pip install 'whitenote-huey[greenlet]').
    consumer="python3 -m gevent.monkey --module huey.bin.huey_consumer"
fi

exec $consumer whitenote_huey.huey \
    --workers "${WORKERS:-5}" \
    --worker-type "${WORKER_TYPE:-thread}" \
    --delay "${POLL_DELAY:-0.05}" \
    --max-delay "${POLL_MAX_DELAY:-0.25}" \
    --graceful-signal TERM \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT:-60}" \
    "$@"
