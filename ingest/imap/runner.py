"""The connector runner (``python manage.py runconnectors``): one process, one event loop.

Design: every account is a coroutine (:class:`~ingest.imap.session.Session`) on one asyncio
loop, not a thread: an idle IMAP session is a socket, a stream buffer and a suspended task,
so one process holds thousands of IDLE accounts (bench/imap_pull.py measures the RSS per
account). Database work (leases, cursors, ``accept`` into the spool) runs in a small
thread pool, so a slow query never stalls the sockets; the drain of what the sessions took
in (blob, Message rows, events, parse) runs on threads of its own, in batches: an entry
waits for no IMAP session's query, and under load one transaction drains many entries.

Every ``CONNECTOR_LEASE_SECONDS / 3`` the supervisor renews its leases (a connector whose
lease is gone, or whose settings changed, has its session stopped or restarted), then
claims free connectors up to ``CONNECTOR_CAPACITY``. Several runners on several machines
share the accounts this way; a dead runner's accounts are claimed by the others once its
leases expire. A heartbeat row (kind ``connectors``) tells ``/readyz`` the runner lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import close_old_connections, connections

from ingest.heartbeats import HeartbeatThread
from ingest.imap import leases, metrics
from ingest.imap.session import Session
from ingest.models import Heartbeat
from ingest.services import spool_default, spool_drain, spool_entries_drain

logger = logging.getLogger(__name__)

SPOOL_SWEEP_SECONDS = 60.0
CONNECT_CONCURRENCY = 32  # sessions connecting, logging in and catching up at once
TRIM_AFTER_SECONDS = 30.0  # quiet time after a ramp before freed heap is handed back
DRAIN_THREADS = 2
CONNECTION_CHECK_SECONDS = 5.0
DRAIN_BATCH = 32  # spool entries drained in one transaction at most


def _malloc_trim() -> None:
    """Give freed heap back to the system after a ramp (glibc keeps it otherwise): the RSS
    of a runner holding idle accounts then reflects the accounts, not the connect burst."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def owner_name(node: str | None = None) -> str:
    """``host:pid:random``: unique per process, so a restarted runner never reuses a lease."""
    return f"{node or socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"[:200]


_thread_state = threading.local()


def _in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``function`` on this pool thread's database connection.

    The connection is looked at (CONN_MAX_AGE, CONN_HEALTH_CHECKS: a ``SELECT 1`` before
    its next query) at most every CONNECTION_CHECK_SECONDS, and at once after a failure,
    not around every call: at 20 messages a second that check was a round trip in front
    of every take and drain.
    """
    now = time.monotonic()
    if now - getattr(_thread_state, "checked_at", -CONNECTION_CHECK_SECONDS) >= CONNECTION_CHECK_SECONDS:
        _thread_state.checked_at = now
        close_old_connections()
    try:
        return function(*args, **kwargs)
    except BaseException:
        _thread_state.checked_at = now - CONNECTION_CHECK_SECONDS  # a broken connection goes now
        close_old_connections()
        raise


@dataclass
class _Held:
    session: Session
    task: asyncio.Task[None]
    token: int
    generation: int


class Runner:
    def __init__(
        self,
        *,
        owner: str | None = None,
        capacity: int | None = None,
        stagger: float | None = None,
        db_threads: int = 4,
        drain_threads: int = DRAIN_THREADS,
    ) -> None:
        self.owner = owner or owner_name()
        self.capacity = capacity or int(settings.CONNECTOR_CAPACITY)
        self.stagger = float(settings.CONNECTOR_STARTUP_STAGGER if stagger is None else stagger)
        self.executor = ThreadPoolExecutor(max_workers=db_threads, thread_name_prefix="connector-db")
        self.drain_executor = ThreadPoolExecutor(max_workers=drain_threads, thread_name_prefix="connector-drain")
        self.drain_threads = drain_threads
        self.drain_waiting: list[str] = []  # taken in, not yet handed to a drain thread
        self.drain_known: set[str] = set()  # waiting or being drained
        self.drain_wake = asyncio.Event()
        self.held: dict[UUID, _Held] = {}
        self.spool = spool_default()
        self.interval = max(0.5, settings.CONNECTOR_LEASE_SECONDS / 3)
        self.first_round = True
        self.connect_slots = asyncio.Semaphore(CONNECT_CONCURRENCY)
        self.trim_due: float | None = None
        self.rounds = 0  # lease rounds done (tests wait for rounds instead of sleeping)

    async def db(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(_in_thread, function, *args, **kwargs))

    def drain(self, queue_ids: list[str]) -> None:
        """Hand spool entries to the drain threads (the session does not wait for them)."""
        fresh = [queue_id for queue_id in queue_ids if queue_id not in self.drain_known]
        self.drain_known.update(fresh)
        self.drain_waiting.extend(fresh)
        if self.drain_waiting:
            self.drain_wake.set()

    async def _drain_loop(self) -> None:
        """One per drain thread: whatever waits (up to DRAIN_BATCH) in one transaction
        (:func:`ingest.services.spool_entries_drain`); a failure leaves it for the sweep."""
        loop = asyncio.get_running_loop()
        while True:
            await self.drain_wake.wait()
            batch = self.drain_waiting[:DRAIN_BATCH]
            del self.drain_waiting[:DRAIN_BATCH]
            if not self.drain_waiting:
                self.drain_wake.clear()
            if not batch:
                continue
            try:
                await loop.run_in_executor(
                    self.drain_executor, functools.partial(_in_thread, spool_entries_drain, self.spool, batch)
                )
            except Exception as exc:
                logger.warning("drain of %d entries failed, the sweep retries: %s", len(batch), type(exc).__name__)
            finally:
                self.drain_known.difference_update(batch)

    async def _drains_finish(self, tasks: list[asyncio.Task[None]]) -> None:
        """At shutdown: drain what waits, then stop the drain loops."""
        for _ in range(100):
            if not self.drain_waiting and not self.drain_known:
                break
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, connector_id: UUID, token: int, generation: int, *, stagger: float) -> None:
        session = Session(
            connector_id=connector_id, token=token, db=self.db, stagger=stagger, drain=self.drain,
            connect_slots=self.connect_slots,
        )  # fmt: skip
        task = asyncio.create_task(session.run(), name=f"connector-{connector_id}")
        self.held[connector_id] = _Held(session, task, token, generation)

    async def _stop(self, connector_id: UUID) -> None:
        held = self.held.pop(connector_id, None)
        if held is None:
            return
        held.session.stop()
        held.task.cancel()
        await asyncio.wait({held.task}, timeout=5)

    async def round(self) -> None:
        """Renew, stop what was lost or changed, claim more."""
        for connector_id, held in list(self.held.items()):
            if held.task.done():  # auth_failed (released) or lease lost
                self.held.pop(connector_id, None)
        kept = await self.db(
            leases.leases_renew, owner=self.owner, held={pk: held.token for pk, held in self.held.items()}
        )
        for connector_id, held in list(self.held.items()):
            if connector_id not in kept:
                logger.info("connector %s: lease lost or connector stopped", connector_id)
                await self._stop(connector_id)
            elif kept[connector_id] != held.generation:
                logger.info("connector %s: settings changed, restarting its session", connector_id)
                token = held.token
                await self._stop(connector_id)
                self._start(connector_id, token, kept[connector_id], stagger=0)
        claims = await self.db(
            leases.leases_claim, owner=self.owner, limit=self.capacity - len(self.held), exclude=set(self.held)
        )
        for claim in claims:
            if claim.taken_over:
                metrics.TAKEOVERS.inc()
                logger.info("connector %s: taken over from an expired lease", claim.connector_id)
            self._start(
                claim.connector_id, claim.token, claim.generation, stagger=self.stagger if self.first_round else 0
            )
        self.first_round = False
        metrics.HELD.set(len(self.held))
        loop = asyncio.get_running_loop()
        if claims:
            self.trim_due = loop.time() + self.stagger + TRIM_AFTER_SECONDS
        elif self.trim_due is not None and loop.time() > self.trim_due:
            self.trim_due = None
            await self.db(_malloc_trim)

    async def _connections_close(self, executor: ThreadPoolExecutor, threads: int) -> None:
        """Close each pool thread's database connection (a barrier gives every thread one call)."""
        barrier = threading.Barrier(threads, timeout=5)

        def close() -> None:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()
            connections.close_all()

        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(executor, close) for _ in range(threads)))

    async def run(self, stop: asyncio.Event, *, ready: Callable[[], None] | None = None) -> None:
        heartbeat = HeartbeatThread(
            kind=Heartbeat.Kind.CONNECTORS, node=self.owner, details=lambda: {"connectors": len(self.held)}
        )
        heartbeat.start()
        loop = asyncio.get_running_loop()
        last_sweep = loop.time()
        drainers = [asyncio.create_task(self._drain_loop(), name="connector-drain") for _ in range(self.drain_threads)]
        try:
            with contextlib.suppress(Exception):
                await self.db(spool_drain, self.spool)  # what a crash left behind
            if ready is not None:
                ready()
            while not stop.is_set():
                try:
                    await self.round()
                except Exception as exc:  # the database may be away: keep the sessions, retry
                    logger.warning("connector runner round failed: %s: %s", type(exc).__name__, exc)
                self.rounds += 1
                if loop.time() - last_sweep > SPOOL_SWEEP_SECONDS:  # what a failed drain left
                    last_sweep = loop.time()
                    with contextlib.suppress(OSError):
                        self.drain(await self.db(self.spool.pending))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        finally:
            held = list(self.held.items())
            for connector_id, _ in held:
                await self._stop(connector_id)
            for connector_id, entry in held:
                with contextlib.suppress(Exception):
                    await self.db(leases.lease_release, connector_id=connector_id, token=entry.token)
            await self._drains_finish(drainers)
            heartbeat.stop()
            await self._connections_close(self.executor, self.executor._max_workers)
            await self._connections_close(self.drain_executor, self.drain_threads)
            self.executor.shutdown(wait=True)
            self.drain_executor.shutdown(wait=True)
            metrics.HELD.set(0)
