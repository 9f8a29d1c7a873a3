"""Reads of the event log, through the caller's scope.

Audit sits below tenants, so the principal is typed by what it must do (a Protocol), not
by importing tenants.access.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from typing import Any, Protocol, TypeVar
from uuid import UUID

from django.db.models import Model, Q, QuerySet

from audit.models import AuditEntry, Event, EventQuerySet
from mailplatform.pagination import cursor_sign, cursor_unsign

M = TypeVar("M", bound=Model)


class Scoped(Protocol):
    def scope(
        self,
        queryset: QuerySet[M],
        *,
        tenant_field: str = ...,
        domain_field: str | None = ...,
        mailbox_field: str | None = ...,
    ) -> QuerySet[M]: ...


class InvalidCursor(ValueError):
    pass


def event_list(
    principal: Scoped,
    *,
    types: list[str] | None = None,
    mailbox_id: UUID | None = None,
    message_id: UUID | None = None,
) -> EventQuerySet:
    """The committed events the principal may see, in log order.

    ``types`` holds exact types or prefixes ending in ``.*`` (``message.*``); ``mailbox_id``
    and ``message_id`` keep only the events pointing at that mailbox or message.
    """
    queryset = principal.scope(Event.objects.all(), domain_field="domain_id", mailbox_field="mailbox_id")
    assert isinstance(queryset, EventQuerySet)
    if mailbox_id is not None:
        queryset = queryset.filter(mailbox_id=mailbox_id)
    if message_id is not None:
        queryset = queryset.filter(message_id=message_id)
    if types:
        wanted = Q(pk__in=[])
        for name in types:
            wanted |= Q(type__startswith=name[:-1]) if name.endswith(".*") else Q(type=name)
        queryset = queryset.filter(wanted)
    return queryset.committed().in_log_order()


def event_get(principal: Scoped, public_id: str) -> Event:
    return principal.scope(Event.objects.all(), domain_field="domain_id", mailbox_field="mailbox_id").get(
        public_id=public_id
    )


def event_position(event: Event) -> str:
    """An opaque, stable cursor for the position just after ``event``."""
    raw = f"{event.txid if event.txid is not None else ''}:{event.seq}"
    return cursor_sign(base64.urlsafe_b64encode(raw.encode()).decode().rstrip("="))


def events_after_cursor(queryset: EventQuerySet, cursor: str) -> EventQuerySet:
    try:
        position = cursor_unsign(cursor)  # a made-up position is refused, not read from
        raw = base64.urlsafe_b64decode(position + "=" * (-len(position) % 4)).decode()
        txid_text, seq_text = raw.split(":")
        txid = int(txid_text) if txid_text else None
        seq = int(seq_text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidCursor("The cursor is not valid.") from exc
    return queryset.after_position(txid, seq)


def events_after_event(queryset: EventQuerySet, principal: Scoped, public_id: str) -> EventQuerySet:
    event = event_get(principal, public_id)
    return queryset.after_position(event.txid, event.seq)


# Apps above audit (webhooks) add to an event's detail without audit importing them.
EventDetailExtra = Callable[[Any, Event], dict[str, Any]]
_detail_extras: list[EventDetailExtra] = []


def event_detail_extra_register(extra: EventDetailExtra) -> None:
    """Add ``extra(principal, event)``'s keys to ``GET /api/v1/events/{id}/`` (e.g. deliveries)."""
    if extra not in _detail_extras:
        _detail_extras.append(extra)


def event_detail(principal: Scoped, event: Event) -> dict[str, Any]:
    """The event's contract JSON plus what registered extras add (never replacing a key)."""
    body = event.as_json()
    for extra in _detail_extras:
        for key, value in extra(principal, event).items():
            body.setdefault(key, value)
    return body


def audit_entry_list(
    principal: Scoped,
    *,
    actor: str | None = None,
    action: str | None = None,
    resource_type: str | None = None,
    resource_id: str | None = None,
    after: datetime | None = None,
    before: datetime | None = None,
) -> QuerySet[AuditEntry]:
    """The tenant's audit trail, newest first. ``action`` may be a prefix ending in ``.*``;
    ``actor`` matches the actor's label, user e-mail or key id."""
    queryset = principal.scope(AuditEntry.objects.all()).select_related("actor_user")
    if actor:
        matches = Q(actor_label__icontains=actor) | Q(actor_user__email__iexact=actor)
        with suppress(ValueError):  # an API key's id, when it is one
            matches |= Q(actor_api_key_id=UUID(actor))
        queryset = queryset.filter(matches)
    if action:
        queryset = (
            queryset.filter(action__startswith=action[:-1]) if action.endswith(".*") else queryset.filter(action=action)
        )
    if resource_type:
        queryset = queryset.filter(resource_type=resource_type)
    if resource_id:
        queryset = queryset.filter(resource_id=resource_id)
    if after:
        queryset = queryset.filter(created_at__gt=after)
    if before:
        queryset = queryset.filter(created_at__lt=before)
    return queryset.order_by("-created_at", "-id")
