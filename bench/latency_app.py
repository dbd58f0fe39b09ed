"""The worker's own Huey with one more task, which records when it started.

``huey_consumer latency_app.huey`` runs the worker's instance (its storage, serializer,
start-up hook and tasks) plus ``stamp``, so enqueue-to-start is measured inside a job.
"""
import time

import whitenote_huey
from whitenote_huey import huey


@huey.task()
def stamp(key: str, enqueued_at: float) -> None:
    """Store how long after ``enqueued_at`` this job started, under ``key``."""
    huey.put(key, time.time() - enqueued_at)


__all__ = ['huey', 'stamp', 'whitenote_huey']
