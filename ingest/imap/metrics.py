"""Prometheus metrics of the connector runner (written into METRICS_DIR like runsmtp's)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTED = Gauge(
    "ingest_imap_connected_accounts", "IMAP accounts with a logged-in session (IDLE or polling)",
    multiprocess_mode="livesum",
)  # fmt: skip
HELD = Gauge("ingest_imap_leased_accounts", "Connectors whose lease this runner holds", multiprocess_mode="livesum")
FETCHED = Counter("ingest_imap_messages_fetched_total", "Messages fetched from IMAP accounts", ["outcome"])
ERRORS = Counter("ingest_imap_errors_total", "Connector session failures, by kind", ["kind"])
TAKEOVERS = Counter("ingest_imap_lease_takeovers_total", "Connectors claimed after another runner's lease expired")
UIDVALIDITY_RESETS = Counter("ingest_imap_uidvalidity_resets_total", "Folder cursors reset by a new UIDVALIDITY")
TAKE_SECONDS = Histogram(
    "ingest_imap_fetch_lag_seconds",
    "Time from a message's download to its durable spool write and cursor commit",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
