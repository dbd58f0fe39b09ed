"""The framework's floor: a no-op task on a Huey made exactly as the worker makes its own.

Same storage (the priority Redis queue, or SQLite), same signed serializer, same task
options; ``huey_consumer noop_app.huey`` with run_consumer.sh's options drains it.
``wait`` only waits, for the waiting benchmarks (common.huey_alone).
"""
import time

import whitenote_huey

huey = whitenote_huey.make_huey(whitenote_huey.settings)


@huey.task(retries=whitenote_huey.RETRIES, retry_delay=whitenote_huey.RETRY_DELAY, context=True)
def noop(user_id: str, message_id: str, task=None) -> None:
    """Takes what auto_tag takes, does nothing."""


@huey.task(retries=whitenote_huey.RETRIES, retry_delay=whitenote_huey.RETRY_DELAY, context=True)
def wait(seconds: float, key: str, task=None) -> None:
    """Only waits, as a job waits on the model; counts itself done in Redis under ``key``
    and notes when (the last to finish notes last)."""
    time.sleep(seconds)
    huey.storage.conn.pipeline().incr(key).set(key + ':finished', repr(time.time())).execute()

