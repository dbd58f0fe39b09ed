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
export PATH PYTHONPATH

exec huey_consumer whitenote_huey.huey \
    --workers "${WORKERS:-5}" \
    --worker-type "${WORKER_TYPE:-thread}" \
    --delay "${POLL_DELAY:-0.05}" \
    --max-delay "${POLL_MAX_DELAY:-0.25}" \
    --graceful-signal TERM \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT:-60}" \
    "$@"
