"""Prometheus metrics of the IMAP and POP3 servers (served on MAILACCESS_METRICS_PORT)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

CONNECTIONS = Counter("mailaccess_connections_total", "Connections accepted", ["protocol"])
CONNECTIONS_OPEN = Gauge(
    "mailaccess_connections_open", "Connections open now", ["protocol"], multiprocess_mode="livesum"
)
CONNECTIONS_REFUSED = Counter(
    "mailaccess_connections_refused_total", "Connections refused by a limit", ["protocol", "limit"]
)
COMMANDS = Counter("mailaccess_commands_total", "Commands handled", ["protocol", "command"])
BYTES_SENT = Counter("mailaccess_bytes_sent_total", "Bytes sent to clients", ["protocol"])
AUTH_FAILURES = Counter("mailaccess_auth_failures_total", "Refused logins", ["protocol", "reason"])
