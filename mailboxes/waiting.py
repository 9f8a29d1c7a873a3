"""Waking waiters when a message is indexed, without a thread or a tight poll per waiter.

The index transaction runs ``NOTIFY mailplatform_indexed, '<tenant> <mailbox> <message>'``
(PostgreSQL delivers a notification only when its transaction commits, so a waiter never
sees a message that is not there yet). Each web process event loop keeps one listening
connection (psycopg 3 async, ``LISTEN``) and a registry of waiters by mailbox and by
tenant; a notification sets the asyncio events of the waiters it concerns, which then
re-run their query once. A slow safety poll (every ``SAFETY_POLL`` seconds) covers a lost
listening connection. On SQLite there is no NOTIFY: waiters poll once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar
from uuid import UUID

from django.db import connection, connections

logger = logging.getLogger(__name__)

CHANNEL = "mailplatform_indexed"
SAFETY_POLL = 5.0  # seconds, while the listener is connected
FALLBACK_POLL = 1.0  # seconds, on SQLite or while the listener is down
T = TypeVar("T")


def wake_publish(*, tenant_id: UUID, mailbox_id: UUID, message_id: UUID) -> None:
    """Announce an indexed message; call inside the index transaction (PostgreSQL only)."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, f"{tenant_id} {mailbox_id} {message_id}"])


def _conninfo() -> dict[str, Any]:
    settings_dict = connections["default"].settings_dict
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


class WakeHub:
    """One LISTEN connection and the waiters of one event loop."""

    def __init__(self) -> None:
        self.waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self.connected = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        import psycopg

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(**_conninfo(), autocommit=True) as listener:
                    await listener.execute(f"LISTEN {CHANNEL}")
                    self.connected.set()
                    # A notification may have been missed while (re)connecting: wake everyone once.
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

    def _dispatch(self, payload: str) -> None:
        tenant_id, _, rest = payload.partition(" ")
        mailbox_id = rest.partition(" ")[0]
        for key in (f"t:{tenant_id}", f"m:{mailbox_id}"):
            for event in self.waiters.get(key, ()):
                event.set()

    def _wake_all(self) -> None:
        for events in self.waiters.values():
            for event in events:
                event.set()

    @contextlib.contextmanager
    def subscribe(self, keys: list[str]) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        for key in keys:
            self.waiters[key].add(event)
        try:
            yield event
        finally:
            for key in keys:
                self.waiters[key].discard(event)
                if not self.waiters[key]:
                    del self.waiters[key]
            if not self.waiters:
                self.stop()

    def stop(self) -> None:
        """Close the listening connection once nobody waits (the next waiter reopens it).

        This also keeps short-lived event loops (a sync server running the async view per
        request) from leaving a connection behind.
        """
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.task = None
        self.connected.clear()


_hubs: dict[asyncio.AbstractEventLoop, WakeHub] = {}


def hub_current() -> WakeHub | None:
    """The hub of the running event loop (PostgreSQL only), started on first use."""
    if connections["default"].vendor != "postgresql":
        return None
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        for stale in [other for other in _hubs if other.is_closed()]:
            del _hubs[stale]
        hub = _hubs[loop] = WakeHub()
    hub.start()
    return hub


def waiter_count() -> int:
    return sum(len(events) for hub in _hubs.values() for events in hub.waiters.values())


async def wait_for(
    find: Callable[[], Awaitable[T | None]], *, tenant_id: UUID, mailbox_id: UUID | None, timeout: float
) -> T | None:
    """Run ``find`` now and after every relevant wake-up until it returns something or time is up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    hub = hub_current() if timeout > 0 else None
    keys = [f"m:{mailbox_id}"] if mailbox_id is not None else [f"t:{tenant_id}"]
    if hub is None:
        context: contextlib.AbstractContextManager[asyncio.Event | None] = contextlib.nullcontext(None)
    else:
        context = hub.subscribe(keys)
    with context as event:
        while True:
            if event is not None:
                event.clear()  # before the query: a wake-up during it is not lost
            found = await find()
            if found is not None:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            if hub is None or event is None:
                await asyncio.sleep(min(FALLBACK_POLL, remaining))
                continue
            if not hub.connected.is_set():
                # Not listening yet: wait for LISTEN, then look again, so nothing is missed.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(hub.connected.wait(), timeout=min(FALLBACK_POLL, remaining))
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=min(SAFETY_POLL, remaining))
