"""The framework's floor: a no-op task on a Huey made exactly as the worker makes its own.

Same storage (the priority Redis queue, or SQLite), same signed serializer, same task
options; ``huey_consumer noop_app.huey`` with run_consumer.sh's options drains it.
"""
import struct
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


def wait_floor(seconds: float, count: int, timeout: float = 600) -> float:
    """Enqueue ``count`` wait tasks at once; seconds until the last one finished."""
    key = 'bench:wait:%d' % time.monotonic_ns()
    pipe = huey.storage.conn.pipeline(transaction=False)
    for _ in range(count):
        pipe.zadd(huey.storage.queue_key, {struct.pack('>Q', int(time.time() * 1e6))
                                           + huey.serialize_task(wait.s(seconds, key)): 0})
    started = time.time()
    pipe.execute()
    deadline = time.monotonic() + timeout
    while int(huey.storage.conn.get(key) or 0) < count:
        if time.monotonic() > deadline:
            raise SystemExit('benchmark stalled: the floor tasks did not finish')
        time.sleep(0.01)
    return float(huey.storage.conn.get(key + ':finished')) - started
