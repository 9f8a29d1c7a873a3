"""Enqueueing Celery tasks once a transaction commits, where a broker outage must not surface.

The database is the source of truth for pending work (a beat sweeper re-enqueues whatever
stays in its state too long), so a task that cannot be sent after a commit is a delay, not a
loss: it is logged and counted, never raised into the code that committed. Raising there is
worse than useless: the caller's ``atomic()`` has committed, yet it would report failure.

Why a class and not ``functools.partial(task.delay, ...)``: Django's ``robust=True``
on-commit handler formats ``func.__qualname__`` when a callback raises, and a partial has no
``__qualname__``; the AttributeError then escapes the committed ``atomic()`` and the
remaining callbacks of the transaction never run.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from django.db import transaction
from prometheus_client import Counter

logger = logging.getLogger(__name__)

ENQUEUE_FAILED = Counter(
    "mailplatform_task_enqueue_failed_total",
    "Tasks that could not be sent to the broker after their transaction committed (a sweeper sends them later).",
    ["task"],
)


class TasksEnqueue:
    """Sends ``task(*args)`` for each collected ``args``; never raises.

    Each call is attempted on its own, so one failure never stops the others. Only the first
    send gets Celery's connection and publish retries: once one has failed, the broker is
    taken to be down and the rest are tried once each on a connection that does not retry,
    so an outage costs milliseconds per task instead of seconds (the sweeper sends them once
    the broker is back).
    """

    def __init__(self, task: Any) -> None:
        self.task = task
        self.calls: list[tuple[Any, ...]] = []
        # Django's robust on-commit handler names the callback by __qualname__ in its log.
        self.__qualname__ = f"{type(self).__qualname__}[{task.name}]"

    def add(self, *args: Any) -> None:
        self.calls.append(args)

    def __call__(self) -> int:
        """Send every call; returns how many could not be sent."""
        failed = 0
        error = ""
        once: Any = None  # the no-retry connection, after a first failure
        try:
            for args in self.calls:
                try:
                    if once is None:
                        self.task.apply_async(args)
                    else:
                        self.task.apply_async(args, connection=once, retry=False)
                except Exception as exc:  # broker down or refusing: the sweeper sends it later
                    failed += 1
                    error = type(exc).__name__
                    if once is None:
                        once = self.task.app.connection_for_write(transport_options={"max_retries": 0})
        finally:
            if once is not None:
                with contextlib.suppress(Exception):
                    once.release()
        if failed:
            ENQUEUE_FAILED.labels(self.task.name).inc(failed)
            logger.warning(
                "could not enqueue %d of %d %s tasks (%s); the sweeper sends them later",
                failed,
                len(self.calls),
                self.task.name,
                error,
            )
        return failed


def tasks_enqueue_on_commit(task: Any, calls: list[tuple[Any, ...]]) -> TasksEnqueue:
    """Send ``task(*args)`` for each of ``calls`` after the current transaction commits.

    Outside a transaction they are sent at once. Failures are logged and counted in
    ``mailplatform_task_enqueue_failed_total``, never raised.
    """
    enqueue = TasksEnqueue(task)
    for args in calls:
        enqueue.add(*args)
    if enqueue.calls:
        transaction.on_commit(enqueue, robust=True)
    return enqueue
