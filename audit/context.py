"""The context of the current request or task: correlation id, client IP, user agent.

Set once at the edge (the request middleware, the SMTP session, a Celery task) and read by
the audit trail, the event log and the log formatter, so none of them needs it passed down.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import UTC, datetime


@dataclass(frozen=True)
class RequestContext:
    correlation_id: str = ""
    ip: str | None = None
    user_agent: str = ""
    tenant: str = ""


_EMPTY = RequestContext()  # frozen, so sharing it as the default is safe
_current: ContextVar[RequestContext] = ContextVar("mailplatform_context", default=_EMPTY)


def new_correlation_id() -> str:
    return secrets.token_hex(8)


def current() -> RequestContext:
    return _current.get()


@contextmanager
def bind(**changes: str | None) -> Iterator[RequestContext]:
    """Run a block with some fields of the context replaced."""
    context = replace(_current.get(), **changes)  # type: ignore[arg-type]
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


class LogContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``tenant`` from the context to every record that lacks them."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _current.get()
        if not getattr(record, "trace_id", None):
            record.trace_id = context.correlation_id or "-"
        if not getattr(record, "tenant", None):
            record.tenant = context.tenant or ""
        return True


_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra=`` fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and value not in (None, ""):
                payload[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def set_tenant(tenant: str) -> None:
    """Name the tenant for the rest of the current request (undone when its ``bind`` exits)."""
    _current.set(replace(_current.get(), tenant=tenant))
