"""Recording events and audit entries. Every app calls these; they call no app above audit."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.utils import timezone

from audit import context
from audit.models import AuditEntry, Event

logger = logging.getLogger(__name__)

# Keys whose values never enter an event, an audit summary or a log line.
SECRET_KEYS = frozenset(
    {"secret", "password", "token", "client_secret", "secret_hash", "signing_secret", "authorization"}
)

EventListener = Callable[[Event], None]
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


def event_listener_register(listener: EventListener) -> None:
    """Call ``listener`` inside the recording transaction for every new event.

    Webhooks use this to create their deliveries atomically with the event.
    """
    if listener not in _listeners:
        _listeners.append(listener)


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
    payload = redact(dict(data or {}))
    for name, value in (("domain", domain_id), ("mailbox", mailbox_id), ("message", message_id)):
        if value is not None:
            payload.setdefault(name, str(value))
    event = Event.objects.create(
        tenant_id=tenant_id,
        type=type,
        timestamp=timezone.now(),
        trace_id=trace_id or context.current().correlation_id,
        data=payload,
        domain_id=domain_id,
        mailbox_id=mailbox_id,
        message_id=message_id,
    )
    for listener in _listeners:
        listener(event)
    return event


def audit_entry_record(
    *,
    tenant_id: UUID | None,
    actor: Actor,
    action: str,
    resource_type: str = "",
    resource_id: object = "",
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
) -> AuditEntry:
    """Write one audit entry for a control-plane write, with the request's IP and correlation id."""
    request = context.current()
    entry = AuditEntry(
        tenant_id=tenant_id,
        actor_type=actor.type,
        actor_user_id=actor.user_id,
        actor_api_key_id=actor.api_key_id,
        actor_label=actor.label[:320],
        ip=request.ip,
        user_agent=request.user_agent,
        action=action,
        resource_type=resource_type,
        resource_id=str(resource_id),
        before=redact(dict(before)) if before is not None else None,
        after=redact(dict(after)) if after is not None else None,
        correlation_id=request.correlation_id,
    )
    entry.save(force_insert=True)
    logger.info("audit %s %s:%s by %s", action, resource_type, resource_id, actor.label)
    return entry


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
