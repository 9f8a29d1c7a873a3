"""Whether mail flows: heartbeats of the processes that move it, and the age of what waits.

The web node's own readiness (database, broker, blob storage) says nothing about the SMTP
nodes, the Celery workers or the connector runners. Each of those beats a row in
:class:`~ingest.models.Heartbeat` every HEARTBEAT_INTERVAL seconds (runsmtp's supervisor,
the worker's main process, the connector runner), an SMTP node with its spool's depth, the
age of its oldest entry and its free space. :func:`mail_flow_status` reads them with the age
of the oldest stored (unparsed) message; ``/readyz`` shows it as warnings (the web node stays
ready) and ``/metrics`` as gauges (:class:`MailFlowCollector`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily

from ingest.models import Heartbeat
from ingest.spool import Spool

logger = logging.getLogger(__name__)

PURGE_AFTER = timedelta(days=1)  # a node silent this long is gone, not stale


def heartbeat_record(
    *, kind: str, node: str, pid: int, started_at: datetime, details: dict[str, Any] | None = None
) -> None:
    """Say that ``node`` of ``kind`` is alive now (one row per kind and node)."""
    Heartbeat.objects.update_or_create(
        kind=kind,
        node=node[:255],
        defaults={"pid": pid, "last_seen": timezone.now(), "started_at": started_at, "details": details or {}},
    )


def heartbeats_purge(*, older_than: timedelta = PURGE_AFTER) -> int:
    """Forget nodes silent for ``older_than`` (decommissioned); returns how many."""
    deleted, _ = Heartbeat.objects.filter(last_seen__lt=timezone.now() - older_than).delete()
    return deleted


def spool_status(spool: Spool) -> dict[str, Any]:
    """What only the SMTP node can see: its spool's depth, oldest entry and free space."""
    pending = spool.pending()
    oldest = 0.0
    for queue_id in pending[:10]:  # time-ordered ids; the first one still there is the oldest
        try:
            oldest = max(0.0, time.time() - (spool.new / queue_id).stat().st_mtime)
            break
        except FileNotFoundError:
            continue
    return {
        "spool_depth": len(pending),
        "spool_oldest_age_seconds": round(oldest, 1),
        "spool_free_bytes": spool.free_bytes(),
        "spool_low_water_bytes": settings.INGEST_SPOOL_LOW_WATER,
    }


class HeartbeatThread(threading.Thread):
    """Beats every HEARTBEAT_INTERVAL seconds until stopped; a database outage is logged, not fatal."""

    def __init__(self, *, kind: str, node: str, details: Callable[[], dict[str, Any]] | None = None) -> None:
        super().__init__(name=f"heartbeat-{kind}", daemon=True)
        self.kind = kind
        self.node = node
        self.details = details
        self.started_at = timezone.now()
        self.stopping = threading.Event()

    def beat(self) -> None:
        close_old_connections()
        heartbeat_record(
            kind=self.kind,
            node=self.node,
            pid=os.getpid(),
            started_at=self.started_at,
            details=self.details() if self.details else None,
        )

    def run(self) -> None:
        failing = False
        while not self.stopping.is_set():
            try:
                self.beat()
                failing = False
            except Exception as exc:  # the database may be away; the next beat tries again
                if not failing:
                    logger.warning("heartbeat of %s %s failed: %s", self.kind, self.node, type(exc).__name__)
                failing = True
                connection.close()
            self.stopping.wait(settings.HEARTBEAT_INTERVAL)
        connection.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)


def smtp_heartbeat_start(spool: Spool, *, port: int) -> HeartbeatThread:
    """runsmtp's supervisor: the node (host and port) with its spool's status."""
    thread = HeartbeatThread(
        kind=Heartbeat.Kind.SMTP, node=f"{socket.gethostname()}:{port}", details=lambda: spool_status(spool)
    )
    thread.start()
    return thread


_worker_heartbeat: HeartbeatThread | None = None


def worker_heartbeat_start(*, node: str) -> None:
    """A Celery worker's main process (the ``worker_ready`` signal): beats until shutdown."""
    global _worker_heartbeat
    if _worker_heartbeat is None:
        _worker_heartbeat = HeartbeatThread(kind=Heartbeat.Kind.WORKER, node=node)
        _worker_heartbeat.start()


def worker_heartbeat_stop() -> None:
    global _worker_heartbeat
    if _worker_heartbeat is not None:
        _worker_heartbeat.stop()
        _worker_heartbeat = None


# --- reading -------------------------------------------------------------------------
UNPARSED_SAMPLE = 200


def _unparsed_oldest_age(now: datetime) -> float | None:
    """Age of the oldest stored message, read through the (state, state_changed_at) index.

    A probe must stay cheap under a backlog of millions: the longest-untouched stored rows
    are taken from the index and the oldest reception among them is reported (never younger
    than the longest wait, since a message is received before its state last changed).
    """
    from mailboxes.models import Message

    received = list(
        Message.objects.filter(state=Message.State.STORED)
        .order_by("state_changed_at")
        .values_list("received_at", flat=True)[:UNPARSED_SAMPLE]
    )
    return max(0.0, (now - min(received)).total_seconds()) if received else None


def _connectors_waiting() -> bool:
    """Whether any IMAP connector should be held by a runner (runconnectors)."""
    from ingest.models import Connector

    return Connector.objects.filter(active=True).exclude(state=Connector.State.AUTH_FAILED).exists()


def mail_flow_status() -> dict[str, Any]:
    """Nodes with their ages, and warnings: stale nodes, no live worker or SMTP node, old backlog.

    ``status`` is "degraded" when there is any warning, else "ok".
    """
    now = timezone.now()
    stale_after = settings.HEARTBEAT_STALE_AFTER
    nodes: list[dict[str, Any]] = []
    warnings: list[dict[str, Any]] = []
    live: dict[str, int] = {kind: 0 for kind in Heartbeat.Kind.values}
    spool_oldest: float | None = None
    for row in Heartbeat.objects.order_by("kind", "node"):
        age = max(0.0, (now - row.last_seen).total_seconds())
        stale = age > stale_after
        node: dict[str, Any] = {
            "kind": row.kind,
            "node": row.node,
            "pid": row.pid,
            "age_seconds": round(age, 1),
            "stale": stale,
        }
        nodes.append(node)
        if stale:
            warnings.append(
                {"code": f"{row.kind}_stale", "node": row.node, "message": f"No heartbeat for {round(age)} s."}
            )
            continue
        live[row.kind] += 1
        if row.kind != Heartbeat.Kind.SMTP:
            continue
        details = row.details or {}
        node.update({key: value for key, value in details.items() if key.startswith("spool_")})
        if details.get("spool_depth"):
            oldest = float(details.get("spool_oldest_age_seconds") or 0.0) + age  # as of now
            spool_oldest = max(spool_oldest or 0.0, oldest)
            if oldest > settings.MAIL_FLOW_SPOOL_MAX_AGE:
                warnings.append(
                    {"code": "spool_backlog", "node": row.node, "message": f"Oldest spool entry {round(oldest)} s old."}
                )
        free, low_water = details.get("spool_free_bytes"), details.get("spool_low_water_bytes")
        if free is not None and low_water is not None and free < low_water:
            warnings.append(
                {"code": "spool_low_space", "node": row.node, "message": "Spool below its low-water mark: 452 4.3.1."}
            )
    if not live[Heartbeat.Kind.SMTP]:
        warnings.append({"code": "no_live_smtp_node", "message": "No SMTP node has beaten recently."})
    if not live[Heartbeat.Kind.WORKER]:
        warnings.append({"code": "no_live_worker", "message": "No Celery worker has beaten recently."})
    if not live[Heartbeat.Kind.CONNECTORS] and _connectors_waiting():
        warnings.append(
            {"code": "no_live_connector_runner", "message": "IMAP connectors are active, but no runconnectors beats."}
        )
    unparsed = _unparsed_oldest_age(now)
    if unparsed is not None and unparsed > settings.MAIL_FLOW_UNPARSED_MAX_AGE:
        warnings.append({"code": "unparsed_backlog", "message": f"Oldest unparsed message {round(unparsed)} s old."})
    return {
        "status": "degraded" if warnings else "ok",
        "warnings": warnings,
        "nodes": nodes,
        "spool_oldest_age_seconds": None if spool_oldest is None else round(spool_oldest, 1),
        "unparsed_oldest_age_seconds": None if unparsed is None else round(unparsed, 1),
    }


class MailFlowCollector:
    """Heartbeat ages per node, the oldest spool entry per SMTP node, the oldest unparsed message."""

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # nothing queried at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            now = timezone.now()
            rows = list(Heartbeat.objects.order_by("kind", "node"))
            unparsed = _unparsed_oldest_age(now)
        except Exception as exc:  # a scrape must not fail because the database is away
            logger.warning("mail flow metrics unavailable: %s", type(exc).__name__)
            return
        ages = GaugeMetricFamily(
            "mailplatform_heartbeat_age_seconds",
            "Seconds since each SMTP node, worker and connector runner last beat.",
            labels=["kind", "node"],
        )
        spool = GaugeMetricFamily(
            "mailplatform_spool_oldest_age_seconds",
            "Age of the oldest entry in each SMTP node's spool (0 when empty).",
            labels=["node"],
        )
        for row in rows:
            age = max(0.0, (now - row.last_seen).total_seconds())
            ages.add_metric([row.kind, row.node], age)
            if row.kind == Heartbeat.Kind.SMTP:
                details = row.details or {}
                oldest = float(details.get("spool_oldest_age_seconds") or 0.0)
                spool.add_metric([row.node], oldest + age if details.get("spool_depth") else 0.0)
        yield ages
        yield spool
        yield GaugeMetricFamily(
            "mailplatform_unparsed_oldest_age_seconds",
            "Age of the oldest message stored but not parsed yet (0 when none).",
            unparsed or 0.0,
        )


_registered = False


def mail_flow_collector_register() -> None:
    global _registered
    if not _registered:
        from prometheus_client import REGISTRY

        REGISTRY.register(MailFlowCollector())  # type: ignore[arg-type]
        _registered = True
