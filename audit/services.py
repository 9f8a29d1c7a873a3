"""Recording events and audit entries. Every app calls these; they call no app above audit."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from audit import context
from audit.models import AuditEntry, Event
from mailplatform.rows import rows_insert

logger = logging.getLogger(__name__)

# Keys whose values never enter an event, an audit summary or a log line.
SECRET_KEYS = frozenset(
    {"secret", "password", "token", "client_secret", "secret_hash", "signing_secret", "authorization"}
)

# A listener gets every batch of new events, inside the transaction that records them.
EventListener = Callable[[list[Event]], object]
_listeners: list[EventListener] = []


@dataclass(frozen=True)
class Actor:
    """Who performs a write, as the audit trail records it."""

    type: str
    label: str
    user_id: int | None = None
    api_key_id: UUID | None = None

    @classmethod
    def system(cls, label: str = "system") -> Actor:
        return cls(type=AuditEntry.ActorType.SYSTEM, label=label)

    @property
    def is_anonymous(self) -> bool:
        """A person who proved no identity (a refused sign-in): the label is only their claim."""
        return self.type == AuditEntry.ActorType.USER and self.user_id is None


# Anonymous entries are written on behalf of whoever calls a public page (a failed sign-in),
# so they are bounded: what they carry is cut short, and one address writes at most
# AUDIT_ANONYMOUS_PER_IP of them per tenant in AUDIT_ANONYMOUS_WINDOW seconds; past that
# they are logged, not stored, and a flood cannot bury a tenant's real trail.
ANONYMOUS_USER_AGENT_MAX = 128
ANONYMOUS_LABEL_MAX = 254  # an e-mail address at most (RFC 5321 section 4.5.3.1.3)


def event_listener_register(listener: EventListener) -> None:
    """Call ``listener`` inside the recording transaction with every batch of new events.

    Webhooks use this to create their deliveries atomically with the events.
    """
    if listener not in _listeners:
        _listeners.append(listener)


@dataclass(frozen=True)
class EventSpec:
    """One event to record (see :func:`event_record` for the fields)."""

    tenant_id: UUID
    type: str
    data: Mapping[str, Any] | None = None
    trace_id: str | None = None
    domain_id: UUID | None = None
    mailbox_id: UUID | None = None
    message_id: UUID | None = None


def event_record(
    *,
    tenant_id: UUID,
    type: str,
    data: Mapping[str, Any] | None = None,
    trace_id: str | None = None,
    domain_id: UUID | None = None,
    mailbox_id: UUID | None = None,
    message_id: UUID | None = None,
) -> Event:
    """Append an event to the tenant's log.

    ``data`` holds ids and pointers only, never message bodies or secrets. Call inside the
    transaction that makes the change, so the event exists exactly when the change does.
    """
    spec = EventSpec(tenant_id, type, data, trace_id, domain_id, mailbox_id, message_id)
    return events_record([spec])[0]


def events_record(specs: Sequence[EventSpec]) -> list[Event]:
    """Append several events with one INSERT, in the order given (their log order).

    For batches recorded in one transaction (the drainer's group of spool entries); the
    listeners get the whole batch, so webhooks fan it out with one query per step too.
    """
    now = timezone.now()
    fallback_trace = context.current().correlation_id
    events = []
    for spec in specs:
        payload = redact(dict(spec.data or {}))
        for name, value in (("domain", spec.domain_id), ("mailbox", spec.mailbox_id), ("message", spec.message_id)):
            if value is not None:
                payload.setdefault(name, str(value))
        events.append(
            Event(
                tenant_id=spec.tenant_id,
                type=spec.type,
                timestamp=now,
                trace_id=spec.trace_id or fallback_trace,
                data=payload,
                domain_id=spec.domain_id,
                mailbox_id=spec.mailbox_id,
                message_id=spec.message_id,
            )
        )
    if not events:
        return []
    # One INSERT whose values are one JSON document on PostgreSQL (bulk_create elsewhere),
    # in the order given, so seq follows it; RETURNING fills seq and txid (seq alone on SQLite).
    events = rows_insert(events, returning=("seq", "txid"), match="public_id")
    for listener in _listeners:
        listener(events)
    return events


def audit_entry_record(
    *,
    tenant_id: UUID | None,
    actor: Actor,
    action: str,
    resource_type: str = "",
    resource_id: object = "",
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
) -> AuditEntry | None:
    """Write one audit entry for a control-plane write, with the request's IP and correlation id.

    An anonymous actor's entry (see :attr:`Actor.is_anonymous`) is marked ``anonymous``, its
    user agent and label are cut short, and it is not written (None) once the caller's
    address has written its share for the tenant in the current window.
    """
    request = context.current()
    anonymous = actor.is_anonymous
    label, user_agent = actor.label[:320], request.user_agent
    if anonymous:
        label, user_agent = _printable(label)[:ANONYMOUS_LABEL_MAX], _printable(user_agent)[:ANONYMOUS_USER_AGENT_MAX]
        if _anonymous_quota_spent(tenant_id, request.ip):
            logger.warning("audit %s by an anonymous caller from %s not recorded: over its quota", action, request.ip)
            return None
    entry = AuditEntry(
        tenant_id=tenant_id,
        actor_type=actor.type,
        actor_user_id=actor.user_id,
        actor_api_key_id=actor.api_key_id,
        actor_label=label,
        anonymous=anonymous,
        ip=request.ip,
        user_agent=user_agent,
        action=action,
        resource_type=resource_type,
        resource_id=str(resource_id),
        before=redact(dict(before)) if before is not None else None,
        after=redact(dict(after)) if after is not None else None,
        correlation_id=request.correlation_id,
    )
    entry.save(force_insert=True)
    # Logged once the entry is durable: a write rolled back leaves no line claiming it happened.
    # The trace id and tenant are taken now, since the commit may come after the request's context.
    summary = (action, resource_type, str(resource_id), actor.label)
    extra = {"trace_id": request.correlation_id, "tenant": request.tenant}
    transaction.on_commit(lambda: logger.info("audit %s %s:%s by %s", *summary, extra=extra))
    return entry


def _printable(text: str) -> str:
    """Control characters (CR, LF, tab, escapes) out: they forge lines in logs and exports."""
    return "".join(char for char in text if char.isprintable())


def _anonymous_quota_spent(tenant_id: UUID | None, ip: str | None) -> bool:
    """Has ``ip`` written its anonymous entries for this tenant in the current window?

    A count over a partial index; two concurrent requests may both pass at the edge, so the
    bound can be overshot by the number of requests in flight, never more.
    """
    limit = int(getattr(settings, "AUDIT_ANONYMOUS_PER_IP", 20))
    window = timedelta(seconds=int(getattr(settings, "AUDIT_ANONYMOUS_WINDOW", 600)))
    recent = AuditEntry.objects.filter(anonymous=True, created_at__gte=timezone.now() - window)
    recent = recent.filter(tenant_id=tenant_id) if tenant_id is not None else recent.filter(tenant__isnull=True)
    recent = recent.filter(ip=ip) if ip is not None else recent.filter(ip__isnull=True)
    return recent[:limit].count() >= limit


def redact(values: dict[str, Any]) -> dict[str, Any]:
    """Drop secret-named keys, recursively; values are converted to JSON-friendly types."""
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if key.lower() in SECRET_KEYS:
            continue
        if isinstance(value, Mapping):
            clean[key] = redact(dict(value))
        elif isinstance(value, (list, tuple, set, frozenset)):
            clean[key] = [str(item) if isinstance(item, UUID) else item for item in value]
        elif isinstance(value, UUID):
            clean[key] = str(value)
        elif hasattr(value, "isoformat"):
            clean[key] = value.isoformat()
        else:
            clean[key] = value
    return clean
