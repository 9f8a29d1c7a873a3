"""Writes for webhooks: endpoints (create, update, rotate, disable), fan-out from the event
log, manual retry and replay. Sending lives in :mod:`webhooks.delivery`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q

from audit import selectors as audit_selectors
from audit.catalogue import event_type_pattern_known
from audit.models import Event
from audit.services import Actor, audit_entry_record
from mailboxes.models import Mailbox
from mailplatform.enqueue import TasksEnqueue
from mailplatform.rows import rows_insert
from tenants.access import Permission, Principal
from tenants.models import Domain, Membership
from webhooks import clock, signing, transport
from webhooks.models import Delivery, Endpoint

logger = logging.getLogger(__name__)

MAX_EVENT_TYPES = 50
MAX_RESOURCE_FILTERS = 200
WEBHOOK_EVENT_PREFIX = "webhook."


def _require(principal: Principal) -> None:
    if not principal.has_perm(Permission.WEBHOOKS_MANAGE):
        raise PermissionDenied(f"This action needs the {Permission.WEBHOOKS_MANAGE} permission.")
    if not principal.is_tenant_wide:
        # An endpoint receives the whole tenant's events; a key limited to some domains or
        # mailboxes must not be able to widen its reach through one.
        raise PermissionDenied("Webhooks can only be managed with a key for the whole tenant.")


def _safe_url(url: str) -> str:
    """The URL without its query string (which may hold a token), for the audit trail."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _summary(endpoint: Endpoint) -> dict[str, Any]:
    return {
        "url": _safe_url(endpoint.url),
        "description": endpoint.description,
        "event_types": list(endpoint.event_types),
        "domain_ids": list(endpoint.domain_ids),
        "mailbox_ids": list(endpoint.mailbox_ids),
        "enabled": endpoint.enabled,
    }


# --- Validation ------------------------------------------------------------------------
def event_types_normalize(values: Iterable[str]) -> list[str]:
    """Exact types (``ingest.received``) or prefixes (``message.*``), deduplicated.

    Each must name a type of the catalogue (:mod:`audit.catalogue`): a misspelt type would
    leave the endpoint waiting for events that never come, so it is refused
    (``unknown_event_type``), every unknown one named."""
    types = list(dict.fromkeys(value.strip().lower() for value in values if value and value.strip()))
    if len(types) > MAX_EVENT_TYPES:
        raise ValidationError({"event_types": f"At most {MAX_EVENT_TYPES} types."}, code="invalid")
    unknown = [name for name in types if not event_type_pattern_known(name)]
    if unknown:
        listed = ", ".join(repr(name) for name in unknown)
        problem = f"Unknown event types: {listed}. Give types of the event catalogue, or prefixes like 'message.*'."
        raise ValidationError({"event_types": ValidationError(problem, code="unknown_event_type")})
    return types


# The resource filters: their model, and the API field that names them in an error.
_RESOURCE_FILTERS: dict[str, tuple[type[Domain] | type[Mailbox], str]] = {
    "domain": (Domain, "domains"),
    "mailbox": (Mailbox, "mailboxes"),
}


def _resource_ids(principal: Principal, ids: Iterable[UUID | str], *, kind: str) -> list[str]:
    model, field = _RESOURCE_FILTERS[kind]
    wanted = list(dict.fromkeys(str(value) for value in ids))
    if len(wanted) > MAX_RESOURCE_FILTERS:
        raise ValidationError({field: f"At most {MAX_RESOURCE_FILTERS}."}, code="invalid")
    if not wanted:
        return []
    try:
        uuids = [UUID(value) for value in wanted]
    except ValueError:
        raise ValidationError({field: "Must be ids."}, code="invalid") from None
    found = {str(pk) for pk in model.objects.filter(tenant=principal.tenant, pk__in=uuids).values_list("pk", flat=True)}
    missing = [value for value in (str(u) for u in uuids) if value not in found]
    if missing:
        raise ValidationError({field: f"Not one of your {field}: {missing[0]}."}, code="invalid")
    return [str(u) for u in uuids]


def url_validate(url: str) -> str:
    """The URL's shape and every address it resolves to, now (a clear 400 when refused)."""
    url = url.strip()
    try:
        transport.url_resolve(url)
    except transport.UrlRefused as exc:
        raise ValidationError({"url": str(exc)}, code="url_refused") from None
    return url


# --- Endpoints -------------------------------------------------------------------------
def endpoint_create(
    *,
    principal: Principal,
    url: str,
    description: str = "",
    event_types: Sequence[str] = (),
    domain_ids: Sequence[UUID | str] = (),
    mailbox_ids: Sequence[UUID | str] = (),
) -> tuple[Endpoint, str]:
    """Create an endpoint; returns it and its signing secret, which is never shown again."""
    _require(principal)
    secret = signing.secret_generate()
    endpoint = Endpoint(
        tenant=principal.tenant,
        url=url_validate(url),
        description=description,
        event_types=event_types_normalize(event_types),
        domain_ids=_resource_ids(principal, domain_ids, kind="domain"),
        mailbox_ids=_resource_ids(principal, mailbox_ids, kind="mailbox"),
        secret_encrypted=signing.secret_encrypt(secret),
    )
    endpoint.full_clean()
    with transaction.atomic():
        endpoint.save()
        audit_entry_record(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action="webhook.create",
            resource_type="webhook",
            resource_id=endpoint.pk,
            after=_summary(endpoint),
        )
    return endpoint, secret


_EDITABLE = ("url", "description", "event_types", "domain_ids", "mailbox_ids", "enabled")


def endpoint_update(*, principal: Principal, endpoint: Endpoint, **changes: Any) -> Endpoint:
    """Change an endpoint's URL, filters or enabled flag (re-enabling clears the failure run)."""
    _require(principal)
    before = _summary(endpoint)
    for name, value in changes.items():
        if name not in _EDITABLE:
            raise ValidationError({name: "This field cannot be changed."}, code="read_only")
        if name == "url":
            value = url_validate(value)
        elif name == "event_types":
            value = event_types_normalize(value)
        elif name in {"domain_ids", "mailbox_ids"}:
            value = _resource_ids(principal, value, kind=name.removesuffix("_ids"))
        elif name == "enabled" and bool(value) != endpoint.enabled:
            endpoint.disabled_at = None if value else clock.now()
            endpoint.disabled_reason = "" if value else f"Disabled by {principal.actor.label}."
            endpoint.failing_since = None
        setattr(endpoint, name, value)
    endpoint.full_clean()
    with transaction.atomic():
        endpoint.save()
        audit_entry_record(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action="webhook.update",
            resource_type="webhook",
            resource_id=endpoint.pk,
            before=before,
            after=_summary(endpoint),
        )
    if changes.get("enabled"):
        transaction.on_commit(_dispatch_soon, robust=True)
    return endpoint


def endpoint_delete(*, principal: Principal, endpoint: Endpoint) -> None:
    _require(principal)
    with transaction.atomic():
        audit_entry_record(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action="webhook.delete",
            resource_type="webhook",
            resource_id=endpoint.pk,
            before=_summary(endpoint),
        )
        endpoint.delete()


def endpoint_secret_rotate(
    *, principal: Principal, endpoint: Endpoint, overlap_seconds: int | None = None
) -> tuple[Endpoint, str]:
    """Add a new secret; the old one keeps signing for the overlap, then is dropped."""
    _require(principal)
    overlap = settings.WEBHOOK_SECRET_OVERLAP if overlap_seconds is None else overlap_seconds
    if not 0 <= overlap <= 7 * 24 * 3600:
        raise ValidationError({"overlap_seconds": "Between 0 and 604800 seconds."}, code="invalid")
    secret = signing.secret_generate()
    now = clock.now()
    with transaction.atomic():
        endpoint = Endpoint.objects.select_for_update().get(pk=endpoint.pk)
        endpoint.previous_secret_encrypted = endpoint.secret_encrypted if overlap else ""
        endpoint.previous_secret_expires_at = now + timedelta(seconds=overlap) if overlap else None
        endpoint.secret_encrypted = signing.secret_encrypt(secret)
        endpoint.secret_rotated_at = now
        endpoint.save()
        audit_entry_record(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action="webhook.rotate_secret",
            resource_type="webhook",
            resource_id=endpoint.pk,
            after={"overlap_seconds": overlap},
        )
    return endpoint, secret


def endpoint_active_secrets(endpoint: Endpoint, at: datetime | None = None) -> list[str]:
    """The secrets that sign now: the current one, and the previous one during its overlap."""
    at = at or clock.now()
    active = [signing.secret_decrypt(endpoint.secret_encrypted)]
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret_encrypted and expires is not None and expires > at:
        active.append(signing.secret_decrypt(endpoint.previous_secret_encrypted))
    return active


def endpoint_disable(*, endpoint: Endpoint, reason: str, notify: bool = True) -> bool:
    """Disable an endpoint for ``reason`` (system action); tell the tenant's admins by e-mail.

    Pending deliveries stay pending and go out once the endpoint is enabled again.
    Returns whether this call disabled it (False when it already was).
    """
    now = clock.now()
    changed = Endpoint.objects.filter(pk=endpoint.pk, enabled=True).update(
        enabled=False, disabled_reason=reason[:500], disabled_at=now, updated_at=now
    )
    if not changed:
        return False
    endpoint.enabled, endpoint.disabled_reason, endpoint.disabled_at = False, reason[:500], now
    audit_entry_record(
        tenant_id=endpoint.tenant_id,
        actor=Actor.system("webhooks"),
        action="webhook.disable",
        resource_type="webhook",
        resource_id=endpoint.pk,
        after={"enabled": False, "reason": reason[:500]},
    )
    logger.warning("webhook endpoint %s disabled: %s", endpoint.pk, reason)
    if notify:
        endpoint_id, tenant_id, host = endpoint.pk, endpoint.tenant_id, endpoint.host
        transaction.on_commit(lambda: _notify_disabled(tenant_id, endpoint_id, host, reason), robust=True)
    return True


def _notify_disabled(tenant_id: UUID, endpoint_id: UUID, host: str, reason: str) -> None:
    recipients = sorted(
        Membership.objects.filter(
            tenant_id=tenant_id, role__in=[Membership.Role.OWNER, Membership.Role.ADMIN], user__is_active=True
        ).values_list("user__email", flat=True)
    )
    if not recipients:
        return
    send_mail(
        subject=f"Webhook endpoint disabled: {host}",
        message=(
            f"The webhook endpoint {endpoint_id} ({host}) has been disabled.\n\n"
            f"Reason: {reason}\n\n"
            "Pending deliveries are kept. Fix the receiver, then enable the endpoint again "
            f"(PATCH {settings.BASE_URL}/api/v1/webhooks/{endpoint_id}/ with enabled=true) "
            "or replay the events you missed.\n"
        ),
        from_email=None,
        recipient_list=recipients,
        fail_silently=False,
    )


# --- Fan-out ---------------------------------------------------------------------------
def type_matches(pattern: str, event_type: str) -> bool:
    if pattern.endswith(".*"):
        return event_type.startswith(pattern[:-1])
    return pattern == event_type


def endpoint_matches(endpoint: Endpoint, event: Event, *, mailbox_domain_id: UUID | None = None) -> bool:
    """Whether ``event`` is owed to ``endpoint`` under its filters.

    ``webhook.*`` events go only to endpoints that name them, and never to the endpoint they
    are about: otherwise a failing endpoint would receive (and fail) its own failure events
    forever.
    """
    if event.type.startswith(WEBHOOK_EVENT_PREFIX):
        if str(event.data.get("endpoint", "")) == str(endpoint.pk):
            return False
        explicit = [name for name in endpoint.event_types if name.startswith(WEBHOOK_EVENT_PREFIX)]
        if not any(type_matches(name, event.type) for name in explicit):
            return False
    elif endpoint.event_types and not any(type_matches(name, event.type) for name in endpoint.event_types):
        return False
    if endpoint.domain_ids or endpoint.mailbox_ids:
        domain = event.domain_id or mailbox_domain_id
        in_domain = domain is not None and str(domain) in endpoint.domain_ids
        in_mailbox = event.mailbox_id is not None and str(event.mailbox_id) in endpoint.mailbox_ids
        return in_domain or in_mailbox
    return True


_endpoint_cache: ContextVar[dict[UUID, list[Endpoint]] | None] = ContextVar("webhook_endpoint_cache", default=None)


@contextmanager
def endpoints_cached() -> Iterator[None]:
    """Within the block, fan-out reads each tenant's endpoints once (for batches of events
    recorded in one short transaction, such as the outcomes of a batch of deliveries)."""
    token = _endpoint_cache.set({})
    try:
        yield
    finally:
        _endpoint_cache.reset(token)


def events_fan_out(events: list[Event]) -> list[Delivery]:
    """Create the events' deliveries inside the recording transaction; send after commit.

    One query for the endpoints of the batch's tenants (none when a cache is active and
    holds them), one for mailbox domains if a domain filter needs them, one INSERT.
    Registered with ``audit.services.event_listener_register``.
    """
    cache = _endpoint_cache.get()
    if cache is None:
        cache = {}
    wanted = {event.tenant_id for event in events} - cache.keys()
    if wanted:
        for tenant_id in wanted:
            cache[tenant_id] = []
        for endpoint in Endpoint.objects.filter(tenant_id__in=wanted, enabled=True).only(
            "id", "tenant_id", "event_types", "domain_ids", "mailbox_ids"
        ):
            cache[endpoint.tenant_id].append(endpoint)
    owed = [(event, cache[event.tenant_id]) for event in events if cache[event.tenant_id]]
    if not owed:
        return []
    mailbox_domains: dict[UUID, UUID] = {}
    lookups = {
        event.mailbox_id
        for event, endpoints in owed
        if event.domain_id is None and event.mailbox_id is not None and any(e.domain_ids for e in endpoints)
    }
    if lookups:
        mailbox_domains = dict(Mailbox.objects.filter(pk__in=lookups).values_list("pk", "domain_id"))
    now = clock.now()
    deliveries = [
        Delivery(tenant_id=event.tenant_id, endpoint_id=endpoint.pk, event=event, next_attempt_at=now)
        for event, endpoints in owed
        for endpoint in endpoints
        if endpoint_matches(
            endpoint,
            event,
            mailbox_domain_id=mailbox_domains.get(event.mailbox_id) if event.mailbox_id else None,
        )
    ]
    if not deliveries:
        return []
    deliveries = rows_insert(deliveries)
    _enqueue_on_commit([str(delivery.pk) for delivery in deliveries])
    return deliveries


class _CommitBatch:
    """The deliveries created in one transaction, enqueued together once it commits."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def flush(self) -> None:
        _enqueue(self.ids)


def _enqueue_on_commit(delivery_ids: list[str]) -> None:
    """Enqueue after commit, in batches per transaction rather than one task per event.

    If a savepoint rollback discards the batch's callback, a new batch starts; an id whose
    row was rolled back is harmless (the task claims nothing), and anything missed is picked
    up by the beat dispatcher.
    """
    connection = transaction.get_connection()
    if not connection.in_atomic_block:
        _enqueue(delivery_ids)
        return
    batch: _CommitBatch | None = getattr(connection, "_webhook_commit_batch", None)
    if batch is None or not any(entry[1] == batch.flush for entry in connection.run_on_commit):
        batch = _CommitBatch()
        connection._webhook_commit_batch = batch  # type: ignore[attr-defined]
        transaction.on_commit(batch.flush, robust=True)
    batch.ids.extend(delivery_ids)


def _enqueue(delivery_ids: list[str]) -> None:
    """Send now, never raising: if the broker is down, the beat dispatcher picks them up later."""
    from webhooks.tasks import BATCH, deliveries_send

    enqueue = TasksEnqueue(deliveries_send)
    for start in range(0, len(delivery_ids), BATCH):
        enqueue.add(delivery_ids[start : start + BATCH])
    enqueue()


def _dispatch_soon() -> None:
    from webhooks.tasks import deliveries_dispatch

    deliveries_dispatch.delay()


# --- Retry and replay ------------------------------------------------------------------
def delivery_retry(*, principal: Principal, delivery: Delivery) -> Delivery:
    """Send one delivery again now, as a new cycle of attempts (same ``webhook-id``)."""
    _require(principal)
    now = clock.now()
    with transaction.atomic():
        updated = (
            Delivery.objects.filter(pk=delivery.pk)
            .exclude(state=Delivery.State.SENDING)
            .update(
                state=Delivery.State.PENDING,
                origin=Delivery.Origin.RETRY,
                attempts=0,
                next_attempt_at=now,
                claim="",
                lease_until=None,
                updated_at=now,
            )
        )
        if not updated:
            raise ValidationError("This delivery is being sent right now.", code="delivery_in_flight")
        audit_entry_record(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action="webhook.retry",
            resource_type="webhook_delivery",
            resource_id=delivery.pk,
        )
    delivery.refresh_from_db()
    if delivery.endpoint.enabled:
        delivery_id = str(delivery.pk)
        transaction.on_commit(lambda: _enqueue([delivery_id]), robust=True)
    return delivery


@dataclass(frozen=True)
class ReplayResult:
    enqueued: int
    first_event: str | None
    last_event: str | None
    truncated: bool
    next_cursor: str | None


def endpoint_replay(
    *,
    principal: Principal,
    endpoint: Endpoint,
    after: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> ReplayResult:
    """Re-enqueue every event matching the endpoint after a cursor (or in a time range).

    In log order, paced at ``WEBHOOK_REPLAY_RATE`` per second by spreading the deliveries'
    due times; at most ``WEBHOOK_REPLAY_MAX`` per call (``next_cursor`` continues).
    Deliveries being sent right now are left alone.
    """
    _require(principal)
    if not endpoint.enabled:
        raise ValidationError("Enable the endpoint before replaying to it.", code="endpoint_disabled")
    if after is None and since is None:
        raise ValidationError("Give 'after' (an event id or cursor) or 'since'.", code="invalid")
    queryset = audit_selectors.event_list(principal, types=[t for t in endpoint.event_types] or None)
    if not endpoint.event_types:
        queryset = queryset.exclude(type__startswith=WEBHOOK_EVENT_PREFIX)
    if endpoint.domain_ids or endpoint.mailbox_ids:
        in_domains = Mailbox.objects.filter(domain_id__in=endpoint.domain_ids).values("pk")
        queryset = queryset.filter(
            Q(domain_id__in=endpoint.domain_ids) | Q(mailbox_id__in=endpoint.mailbox_ids) | Q(mailbox_id__in=in_domains)
        )
    if after:
        try:
            if after.startswith("evt_"):
                queryset = audit_selectors.events_after_event(queryset, principal, after)
            else:
                queryset = audit_selectors.events_after_cursor(queryset, after)
        except (Event.DoesNotExist, audit_selectors.InvalidCursor):
            raise ValidationError({"after": "No such event or cursor."}, code="invalid") from None
    if since is not None:
        queryset = queryset.filter(timestamp__gte=since)
    if until is not None:
        queryset = queryset.filter(timestamp__lt=until)
    limit = settings.WEBHOOK_REPLAY_MAX
    events = list(queryset.only("seq", "txid", "public_id", "tenant_id", "type", "data")[: limit + 1])
    truncated = len(events) > limit
    events = events[:limit]
    cursor_event = events[-1] if events else None
    # The loop guard of endpoint_matches: never an endpoint's own webhook.* events.
    events = [
        event
        for event in events
        if not (event.type.startswith(WEBHOOK_EVENT_PREFIX) and event.data.get("endpoint") == str(endpoint.pk))
    ]
    if not events:
        return ReplayResult(0, None, None, False, None)
    now = clock.now()
    step = timedelta(seconds=1 / settings.WEBHOOK_REPLAY_RATE)
    due = {event.seq: now + step * index for index, event in enumerate(events)}
    with transaction.atomic():
        existing = {
            delivery.event_id: delivery
            for delivery in Delivery.objects.select_for_update().filter(
                endpoint=endpoint, event_id__in=[event.seq for event in events]
            )
        }
        to_update, to_create = [], []
        for event in events:
            delivery = existing.get(event.seq)
            if delivery is None:
                to_create.append(
                    Delivery(
                        tenant_id=endpoint.tenant_id,
                        endpoint=endpoint,
                        event_id=event.seq,
                        origin=Delivery.Origin.REPLAY,
                        next_attempt_at=due[event.seq],
                    )
                )
            elif delivery.state != Delivery.State.SENDING:
                delivery.state, delivery.origin = Delivery.State.PENDING, Delivery.Origin.REPLAY
                delivery.attempts, delivery.next_attempt_at = 0, due[event.seq]
                delivery.claim, delivery.lease_until, delivery.updated_at = "", None, now
                to_update.append(delivery)
        Delivery.objects.bulk_create(to_create, batch_size=500)
        Delivery.objects.bulk_update(
            to_update,
            ["state", "origin", "attempts", "next_attempt_at", "claim", "lease_until", "updated_at"],
            batch_size=500,
        )
        audit_entry_record(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action="webhook.replay",
            resource_type="webhook",
            resource_id=endpoint.pk,
            after={
                "after": after or "",
                "since": since,
                "until": until,
                "events": len(events),
                "first": events[0].public_id,
                "last": events[-1].public_id,
            },
        )
    transaction.on_commit(_dispatch_soon, robust=True)
    return ReplayResult(
        enqueued=len(to_create) + len(to_update),
        first_event=events[0].public_id,
        last_event=events[-1].public_id,
        truncated=truncated,
        next_cursor=audit_selectors.event_position(cursor_event) if truncated and cursor_event else None,
    )
