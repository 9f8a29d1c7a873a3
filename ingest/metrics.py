"""Prometheus metrics of the mail path's front door.

The web's /metrics serves the ones counted in the node's web and worker processes (API
uploads; METRICS_DIR, mailplatform/metrics.py). ``runsmtp`` runs several accept processes
and keeps these in a per-run directory of its own, serving their aggregate on
INGEST_METRICS_PORT from the supervising process (see ingest/server.py).
"""

from __future__ import annotations

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
SPOOL_DEPTH = Gauge("ingest_spool_depth", "Entries waiting in spool/new", multiprocess_mode="max")
SPOOL_FREE_BYTES = Gauge("ingest_spool_free_bytes", "Free bytes on the spool's filesystem", multiprocess_mode="min")
