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

import atexit
import contextlib
import logging
import os
import threading
import time
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


class CoalescedEnqueue:
    """Items handed in by every request of a process, sent as few tasks of up to ``batch``
    items each, by a thread of the process's own instead of each request's.

    A request adds its items after its commit and returns at once; the sender thread takes
    whatever has gathered since its last send, so under load one broker message carries many
    requests' items and when quiet each is sent alone with no added wait. Nothing depends on
    the send for correctness: the database says what is pending, and the beat sweeper sends
    what a process left unsent (a broker outage, or an exit between the commit and the send;
    an exit sends what is left on the way out).
    """

    def __init__(self, task_of: Any, batch: Any) -> None:
        self._task_of = task_of  # () -> the Celery task; called at send time (no import cycle)
        self._batch = batch  # () -> items a task at most (a setting)
        self._condition = threading.Condition()
        self._pending: list[Any] = []
        self._sending = False
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.__qualname__ = f"{type(self).__qualname__}[{getattr(task_of, '__name__', 'task')}]"
        atexit.register(self.flush)
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        # A forked child owns neither the parent's thread nor its lock state.
        self._condition = threading.Condition()
        self._pending, self._sending, self._thread, self._pid = [], False, None, 0

    def add_on_commit(self, items: list[Any]) -> None:
        """Queue ``items`` for sending once the current transaction commits (at once outside one)."""
        if items:
            transaction.on_commit(lambda: self.add(items), robust=True)

    def add(self, items: list[Any]) -> None:
        with self._condition:
            self._pending.extend(items)
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="enqueue", daemon=True)
                self._thread.start()
            self._condition.notify()

    def _take(self) -> list[Any]:
        items, self._pending = self._pending, []
        return items

    def _send(self, items: list[Any]) -> None:
        size = max(1, int(self._batch()))
        enqueue = TasksEnqueue(self._task_of())
        for start in range(0, len(items), size):
            enqueue.add(items[start : start + size])
        enqueue()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._pending:
                    self._sending = False
                    self._condition.notify_all()
                    self._condition.wait()
                self._sending = True
                items = self._take()
            try:
                self._send(items)
            except Exception:  # TasksEnqueue never raises; a bug here must not end the thread
                logger.exception("enqueue: sending %d items failed; the sweeper sends them later", len(items))

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything added so far is sent (at exit, and for tests)."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while (self._pending or self._sending) and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._condition.wait(left)
            items = self._take()  # the thread is gone (or never ran): send what is left here
        if items:
            self._send(items)
