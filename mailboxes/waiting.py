"""Waking waiters when a message is indexed: a waiter costs a coroutine and an event, not a thread.

Once the index transaction commits, ``NOTIFY mailplatform_indexed, '<tenant> <mailbox>
<message>'`` follows (so a waiter never sees a message that is not there yet). Each web
process event loop keeps one listening connection (psycopg 3 async, ``LISTEN``) and a
registry of waiters by mailbox and by tenant.

What makes a thousand waiters cheap:

- Database work never goes through Django's one thread-sensitive thread: it runs in a small
  bounded pool (``WAITING_DB_THREADS`` threads, one connection each) with :func:`db`.
- A notification wakes only the waiters of that mailbox (and the tenant-wide waiters of
  that tenant), and hands them the message id. Waiters that ask the same question (same
  principal scope, mailbox, query, code-or-not) share one query: "is this message one of
  mine?" (:func:`shared`). Their ``after`` is compared in Python, so it does not split them.
- The full re-check (after a reconnect, and a safety tick every ``SAFETY_POLL`` seconds
  for all waiters of the loop at once) is shared the same way.
- The answer body of a message is built once for all waiters it answers.

On SQLite there is no NOTIFY: waiters poll once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection, connections, transaction
from prometheus_client import Gauge

from mailplatform.database import is_pooled

logger = logging.getLogger(__name__)

CHANNEL = "mailplatform_indexed"
SAFETY_POLL = 5.0  # seconds between full re-checks while the listener is connected
FALLBACK_POLL = 1.0  # seconds, on SQLite or while the listener is down
ANSWER_TTL = 5.0  # seconds a shared per-message answer ("is it mine?", its body) is reused
CONNECTION_CHECK = 10.0  # seconds between checks of a pool thread's database connection
T = TypeVar("T")


def wake_publish(*, tenant_id: UUID, mailbox_id: UUID, message_id: UUID) -> None:
    """Announce an indexed message once the index transaction commits (PostgreSQL only).

    Not a NOTIFY inside the index transaction: PostgreSQL serializes the commits of every
    transaction that notifies (one lock on the queue, held through the commit's WAL flush),
    which made parallel parse workers queue behind each other. The notification goes in a
    transaction of its own that has nothing to make durable, so it commits without waiting
    for the flush. If the process dies in between, the waiters' safety re-check finds it.
    """
    if connection.vendor != "postgresql":
        return
    payload = f"{tenant_id} {mailbox_id} {message_id}"

    def notify() -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT set_config('synchronous_commit', 'off', true), pg_notify(%s, %s)", [CHANNEL, payload]
            )

    transaction.on_commit(notify, robust=True)


def wakes_publish(messages: list[tuple[UUID, UUID, UUID]]) -> None:
    """:func:`wake_publish` for several ``(tenant, mailbox, message)`` at once: one statement
    after the commit (a parse batch's), however many messages it announces."""
    if messages:
        _notify_on_commit([f"{tenant_id} {mailbox_id} {message_id}" for tenant_id, mailbox_id, message_id in messages])


def _notify_on_commit(payloads: list[str]) -> None:
    """NOTIFY the payloads in one statement after the commit (PostgreSQL only)."""
    if connection.vendor != "postgresql":
        return

    def notify() -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT set_config('synchronous_commit', 'off', true), pg_notify(%s, payload)"
                " FROM unnest(%s::text[]) AS payload",
                [CHANNEL, payloads],
            )

    transaction.on_commit(notify, robust=True)


def folder_wake_publish(*, tenant_id: UUID, mailbox_id: UUID) -> None:
    """Tell the mailbox's IMAP and POP3 sessions (``m:`` waiters) to look at the folder again,
    without announcing a message: one left ``stored`` (quarantined, or shown unparsed,
    mailboxes.presentation), or parsed but not indexed, may let IMAP show later ones. API
    waiters wake and sleep again without a read (their answer waits for ``indexer.indexed``)."""
    _notify_on_commit([f"{tenant_id} {mailbox_id} -"])


# --- The bounded pool for the waiters' database work --------------------------------------
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
_thread_state = threading.local()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=settings.WAITING_DB_THREADS, thread_name_prefix="waiting-db")
        return _executor


def pool_close() -> None:
    """Close every pool thread's database connection and stop the pool (at shutdown, and
    before a test database is dropped). A barrier makes each thread take exactly one job."""
    global _executor
    with _executor_lock:
        executor, _executor = _executor, None
    if executor is None:
        return
    workers = list(executor._threads)  # the threads that exist; idle ones never connected
    if workers:
        barrier = threading.Barrier(len(workers))

        def close_own_connection() -> None:
            barrier.wait(timeout=10)
            connections.close_all()

        for done in [executor.submit(close_own_connection) for _ in workers]:
            done.result(timeout=15)
    executor.shutdown(wait=True)


def _job(func: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    # Each pool thread keeps its connection between jobs (a request would reconnect); check it
    # now and then, and at once after an error, the way Django does between requests.
    now = time.monotonic()
    if getattr(_thread_state, "checked", 0.0) + CONNECTION_CHECK < now or connection.errors_occurred:
        close_old_connections()
        _thread_state.checked = now
    try:
        return func(*args, **kwargs)
    finally:
        if is_pooled():
            # Borrowed from the web process's pool (mailplatform/database.py): give it back, so
            # idle waiter threads do not sit on connections that requests are waiting for.
            connection.close()


async def db(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run ``func`` (synchronous ORM code) in the waiters' bounded pool, with this context.

    ``WAITING_DB_THREADS = 0`` runs it in Django's thread-sensitive thread instead: the
    in-process test client needs that to see the test's own (uncommitted) transaction.
    """
    if settings.WAITING_DB_THREADS == 0:
        return await sync_to_async(func, thread_sensitive=True)(*args, **kwargs)
    context = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_pool(), functools.partial(context.run, _job, func, args, kwargs))


# --- Shared (coalesced) reads of one event loop --------------------------------------------
@dataclass
class _Entry:
    generation: int
    task: asyncio.Task[Any]
    expires: float = math.inf


_shared: dict[asyncio.AbstractEventLoop, dict[Hashable, _Entry]] = {}


async def shared(key: Hashable, factory: Callable[[], Awaitable[T]], *, generation: int = 0, ttl: float = 0.0) -> T:
    """The result of ``factory()``, run once for every caller asking with the same ``key``.

    A call joins a read in flight (or, within ``ttl`` seconds, a finished one) only if that
    read began at ``generation`` or later: a waiter woken by a notification never reuses a
    read that began before the notification, so it cannot miss the message.
    """
    loop = asyncio.get_running_loop()
    entries = _shared.setdefault(loop, {})
    entry = entries.get(key)
    now = loop.time()
    if entry is not None and entry.generation >= generation and (not entry.task.done() or now < entry.expires):
        return await asyncio.shield(entry.task)
    task: asyncio.Task[T] = loop.create_task(factory())  # type: ignore[arg-type]
    entry = entries[key] = _Entry(generation=generation, task=task)

    def done(finished: asyncio.Task[T]) -> None:
        failed = finished.cancelled() or finished.exception() is not None
        if failed or ttl <= 0:
            if entries.get(key) is entry:
                del entries[key]
            return
        entry.expires = loop.time() + ttl
        loop.call_later(ttl, lambda: entries.get(key) is entry and entries.pop(key))

    task.add_done_callback(done)
    return await asyncio.shield(task)


# --- The listener and the registry of waiters ------------------------------------------------
def _conninfo() -> dict[str, Any]:
    """Where LISTEN goes: a session of its own, so past a transaction pooler when one is named."""
    settings_dict = getattr(settings, "DATABASE_SESSION", None) or connections["default"].settings_dict
    params: dict[str, Any] = {
        "dbname": settings_dict["NAME"],
        "user": settings_dict.get("USER") or None,
        "password": settings_dict.get("PASSWORD") or None,
        "host": settings_dict.get("HOST") or None,
        "port": settings_dict.get("PORT") or None,
        "connect_timeout": 5,
        "application_name": "mailplatform-waiters",
    }
    return {key: value for key, value in params.items() if value is not None}


@dataclass(eq=False)
class Waiter:
    """One waiting request: woken with the ids of announced messages, or for a full re-check."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    announced: list[UUID] = field(default_factory=list)
    recheck: bool = True  # the first look is a full one

    def take(self) -> tuple[list[UUID], bool]:
        announced, recheck = self.announced, self.recheck
        self.announced, self.recheck = [], False
        self.event.clear()
        return announced, recheck


class WakeHub:
    """One LISTEN connection, a safety tick, and the waiters of one event loop."""

    def __init__(self) -> None:
        self.waiters: dict[str, set[Waiter]] = defaultdict(set)
        self.connected = asyncio.Event()
        self.generation = 0  # bumped by every wake-up; see shared()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if not self.tasks or any(task.done() for task in self.tasks):
            self.stop()
            loop = asyncio.get_running_loop()
            self.tasks = [loop.create_task(self._listen()), loop.create_task(self._tick())]

    async def _listen(self) -> None:
        import psycopg

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(**_conninfo(), autocommit=True) as listener:
                    await listener.execute(f"LISTEN {CHANNEL}")
                    self.connected.set()
                    # A notification may have been missed while (re)connecting: look again once.
                    self._wake_all()
                    async for notification in listener.notifies():
                        self._dispatch(notification.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("waiter listener lost (%s); reconnecting", type(exc).__name__)
            self.connected.clear()
            self._wake_all()
            await asyncio.sleep(1.0)

    async def _tick(self) -> None:
        # One safety re-check for every waiter at the same moment, so identical waiters share it.
        while True:
            await asyncio.sleep(SAFETY_POLL)
            self._wake_all()

    def _dispatch(self, payload: str) -> None:
        parts = payload.split(" ")
        if len(parts) != 3:
            return
        if parts[2] == "-":  # folder_wake_publish: the folder's sessions look again
            self.generation += 1
            for waiter in self.waiters.get(f"m:{parts[1]}", ()):
                waiter.event.set()
            return
        try:
            message_id = UUID(parts[2])
        except ValueError:
            return
        self.generation += 1
        for key in (f"t:{parts[0]}", f"m:{parts[1]}"):
            for waiter in self.waiters.get(key, ()):
                waiter.announced.append(message_id)
                waiter.event.set()

    def _wake_all(self) -> None:
        self.generation += 1
        for waiters in self.waiters.values():
            for waiter in waiters:
                waiter.recheck = True
                waiter.event.set()

    @contextlib.contextmanager
    def subscribe(self, keys: list[str]) -> Iterator[Waiter]:
        waiter = Waiter()
        for key in keys:
            self.waiters[key].add(waiter)
        WAITERS.inc()
        try:
            yield waiter
        finally:
            WAITERS.dec()
            for key in keys:
                self.waiters[key].discard(waiter)
                if not self.waiters[key]:
                    del self.waiters[key]
            if not self.waiters:
                self.stop()

    def stop(self) -> None:
        """Close the listening connection once nobody waits (the next waiter reopens it).

        This also keeps short-lived event loops (a sync server running the async view per
        request) from leaving a connection behind.
        """
        for task in self.tasks:
            if not task.done():
                task.cancel()
        self.tasks = []
        self.connected.clear()


_hubs: dict[asyncio.AbstractEventLoop, WakeHub] = {}


def hub_current() -> WakeHub | None:
    """The hub of the running event loop (PostgreSQL only), started on first use."""
    if connections["default"].vendor != "postgresql":
        return None
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        for stale in [other for other in list(_hubs) if other.is_closed()]:
            del _hubs[stale]
            _shared.pop(stale, None)
        hub = _hubs[loop] = WakeHub()
    hub.start()
    return hub


def waiter_count() -> int:
    """Requests waiting in this process."""
    hubs = list(_hubs.values())
    return len({id(waiter) for hub in hubs for waiters in list(hub.waiters.values()) for waiter in list(waiters)})


# Counted up and down, not computed when scraped: in multiprocess mode (METRICS_DIR) only what
# a process writes into its files reaches /metrics, summed over the node's live processes.
WAITERS = Gauge(
    "mailboxes_waiters", "Long-poll requests waiting for a message in the web processes", multiprocess_mode="livesum"
)


# --- Waiting ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """A message that answers a waiter if it arrived after the waiter's ``after``."""

    message_id: UUID
    received_at: datetime


@dataclass(frozen=True)
class Question:
    """What a waiter waits for. Waiters with equal ``key`` share their reads.

    ``find()`` returns the newest matching message; ``check(message_id)`` returns that
    message if it matches. Both are synchronous ORM code (they run in the pool) and ignore
    ``after``, which is applied here.
    """

    key: Hashable
    tenant_id: UUID
    mailbox_id: UUID | None
    after: datetime | None
    find: Callable[[], Candidate | None]
    check: Callable[[UUID], Candidate | None]

    def accepts(self, candidate: Candidate | None) -> bool:
        return candidate is not None and (self.after is None or candidate.received_at > self.after)


async def wait_for(question: Question, *, timeout: float) -> UUID | None:
    """The id of a message answering ``question``, as soon as there is one; None after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    hub = hub_current() if timeout > 0 else None
    if hub is None:
        while True:
            candidate = await db(question.find)
            if question.accepts(candidate):
                assert candidate is not None
                return candidate.message_id
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(FALLBACK_POLL, remaining))
    keys = [f"m:{question.mailbox_id}"] if question.mailbox_id is not None else [f"t:{question.tenant_id}"]
    with hub.subscribe(keys) as waiter:
        while True:
            generation = hub.generation
            announced, recheck = waiter.take()  # before reading: a wake-up during the read is kept
            if recheck or not hub.connected.is_set():
                candidate = await shared(("find", question.key), lambda: db(question.find), generation=generation)
                if question.accepts(candidate):
                    assert candidate is not None
                    return candidate.message_id
            else:
                for message_id in dict.fromkeys(announced):
                    candidate = await shared(
                        ("check", question.key, message_id),
                        functools.partial(db, question.check, message_id),
                        ttl=ANSWER_TTL,  # stable once indexed, whenever it was asked
                    )
                    if question.accepts(candidate):
                        assert candidate is not None
                        return candidate.message_id
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            if not hub.connected.is_set():
                # Not listening (yet): wait for LISTEN or a short poll, then look again in full.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(hub.connected.wait(), timeout=min(FALLBACK_POLL, remaining))
                waiter.recheck = True
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.event.wait(), timeout=remaining)
