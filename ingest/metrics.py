"""Prometheus metrics of the mail path's front door.

Every process of a node writes them into METRICS_DIR (mailplatform/metrics.py): the web's
/metrics serves what the web processes (API uploads), the workers and ``runsmtp``'s accept
processes and drainer counted, and ``runsmtp`` serves the same aggregate on
INGEST_METRICS_PORT (see ingest/server.py; with METRICS_DIR empty, only its own processes').
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Counter("ingest_smtp_connections_total", "SMTP/LMTP connections accepted", ["protocol"])
CONNECTIONS_REFUSED = Counter("ingest_smtp_connections_refused_total", "Connections refused", ["reason"])
REPLIES = Counter("ingest_smtp_replies_total", "Replies sent, by command and code", ["command", "code"])
MESSAGES = Counter("ingest_messages_accepted_total", "Messages durably accepted into the spool", ["source"])
BYTES = Counter("ingest_bytes_accepted_total", "Bytes durably accepted into the spool", ["source"])
LIMITED = Counter("ingest_limited_total", "Requests refused by a limit", ["limit"])
DURABLE_SECONDS = Histogram(
    "ingest_data_to_durable_seconds",
    "Time from the end of DATA to the durable 250",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
DRAINED = Counter("ingest_drained_total", "Spool entries drained into storage and the database", ["outcome"])
DRAIN_LAG = Histogram(
    "ingest_drain_lag_seconds",
    "Time from acceptance to the Message rows committing",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0),
)

# The spool gauges are created on first use (module __getattr__), only in the processes that
# measure the spool: in multiprocess mode a label-less gauge writes its initial 0 into the
# folder when created, and every web process that imports this module would otherwise report
# "0 bytes free" and, aggregated with "min", hide runsmtp's value. "live" modes: a process
# that has ended (mailplatform.metrics.process_dead) no longer counts.
_SPOOL_GAUGES: dict[str, tuple[str, str, Any]] = {
    "SPOOL_DEPTH": ("ingest_spool_depth", "Entries waiting in spool/new", "livemax"),
    "SPOOL_FREE_BYTES": ("ingest_spool_free_bytes", "Free bytes on the spool's filesystem", "livemin"),
}
_created: dict[str, Gauge] = {}
_lock = threading.Lock()


def __getattr__(name: str) -> Gauge:
    """``SPOOL_DEPTH`` and ``SPOOL_FREE_BYTES``, created by the first process that sets them."""
    if name not in _SPOOL_GAUGES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _lock:
        if name not in _created:
            metric, documentation, mode = _SPOOL_GAUGES[name]
            _created[name] = Gauge(metric, documentation, multiprocess_mode=mode)
        return _created[name]
