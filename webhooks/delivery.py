"""Sending deliveries: claim, sign, POST through the SSRF-safe transport, record the outcome.

A delivery is claimed by a conditional update (PENDING and due -> SENDING with a claim token
and a lease); the beat dispatcher claims due ones in batches with ``SELECT ... FOR UPDATE
SKIP LOCKED`` on PostgreSQL. The dispatcher's claim is a *queued* one (its token starts with
:data:`QUEUED`): the send task waits in the broker and starts it, counting the attempt and
taking a fresh lease, only when its HTTP request is about to begin. A queued claim whose lease
runs out (a backlog in the broker, or a lost broker message) is handed out again under the
same token, without counting an attempt and with a lease that doubles up to
:data:`QUEUED_LEASE_MAX`: whichever copy of the task starts first sends it, the other finds it
taken. A worker that dies mid-request leaves the delivery SENDING under a started claim until
its lease expires; the dispatcher then claims it again. The attempt was counted when it
started, so even a delivery that kills its worker every time ends up dead.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Min, Q, QuerySet

from audit.services import EventSpec, events_record
from webhooks import clock, metrics, services, transport
from webhooks.models import Attempt, Delivery, Endpoint
from webhooks.signing import signature_header

logger = logging.getLogger(__name__)

# Waits after the 1st, 2nd, ... failed attempt (the first attempt is immediate).
RETRY_SCHEDULE: tuple[int, ...] = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
MAX_ATTEMPTS = len(RETRY_SCHEDULE) + 1
JITTER = 0.1
RETRY_AFTER_MAX = 24 * 3600
USER_AGENT = "mailplatform-webhooks/1.0"


def retry_delay(failed_attempts: int) -> float | None:
    """Seconds to wait after ``failed_attempts`` failures (with +-10% jitter), None when dead."""
    if failed_attempts < 1 or failed_attempts > len(RETRY_SCHEDULE):
        return None
    return RETRY_SCHEDULE[failed_attempts - 1] * random.uniform(1 - JITTER, 1 + JITTER)


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """A ``Retry-After`` value (RFC 9110 section 10.2.3: seconds or an HTTP-date), clamped."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(int(value))
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    return min(max(seconds, 1.0), RETRY_AFTER_MAX)


def _due(now: datetime) -> Q:
    return Q(state=Delivery.State.PENDING, next_attempt_at__lte=now) | Q(
        state=Delivery.State.SENDING, lease_until__lt=now
    )


# A claim handed to a send task still waiting in the broker; a started one has no prefix.
QUEUED = "q"
# The longest lease of a queued claim handed out again: how late a lost broker message's
# delivery may go out, and how rarely a long backlog gets one more copy of its task.
QUEUED_LEASE_MAX = 900


def _claim_values(token: str, now: datetime, *, start: bool = False) -> dict[str, object]:
    """A claim for a task; ``start``: its HTTP attempt begins now, so the attempt counts."""
    values: dict[str, object] = {
        "state": Delivery.State.SENDING,
        "claim": token if start else QUEUED + token,
        "lease_until": now + timedelta(seconds=settings.WEBHOOK_LEASE),
        "updated_at": now,
    }
    if start:
        values["attempts"] = F("attempts") + 1
    return values


def _claim_rows(ids: list[Any], token: str, now: datetime, *, locked: bool) -> list[tuple[str, str]]:
    """Give the due deliveries among ``ids`` a queued claim: ``[(id, claim)]``.

    One whose queued claim ran out while its task waited in the broker keeps that claim (so
    the waiting task can still start it), no attempt counted; its lease grows with the time
    it has waited (``updated_at``: when it was first queued), so a long backlog is not handed
    a new copy of its task every WEBHOOK_LEASE. ``locked``: the rows are held (PostgreSQL,
    ``FOR UPDATE``), so one UPDATE claims the others; else each is claimed conditionally.
    """
    queued = {
        pk: (claim, since)
        for pk, claim, since in Delivery.objects.filter(
            pk__in=ids, state=Delivery.State.SENDING, claim__startswith=QUEUED, lease_until__lt=now
        ).values_list("pk", "claim", "updated_at")
    }
    claimed = []
    for pk in ids:
        if pk in queued:
            claim, since = queued[pk]
            lease = min(max(settings.WEBHOOK_LEASE, (now - since).total_seconds()), QUEUED_LEASE_MAX)
            if Delivery.objects.filter(pk=pk, state=Delivery.State.SENDING, claim=claim, lease_until__lt=now).update(
                lease_until=now + timedelta(seconds=lease)
            ):
                claimed.append((str(pk), claim))
    fresh = [pk for pk in ids if pk not in queued]
    if locked:
        if fresh:
            Delivery.objects.filter(pk__in=fresh).update(**_claim_values(token, now))
        return claimed + [(str(pk), QUEUED + token) for pk in fresh]
    for pk in fresh:
        if Delivery.objects.filter(_due(now), pk=pk).update(**_claim_values(token, now)):
            claimed.append((str(pk), QUEUED + token))
    return claimed


def deliveries_claim_due(limit: int = 200) -> list[tuple[str, str]]:
    """Claim up to ``limit`` due deliveries, oldest due first: ``[(delivery id, claim)]``.

    PostgreSQL: ``FOR UPDATE SKIP LOCKED`` so concurrent dispatchers take disjoint rows.
    SQLite (one writer at a time): a conditional update per candidate. Replayed deliveries
    keep their log order per endpoint (:func:`_replay_in_order`); an endpoint's replayed
    ones come out of this list next to each other, in log order.
    """
    now = clock.now()
    token = secrets.token_hex(8)
    candidates = Delivery.objects.filter(_due(now), endpoint__enabled=True).order_by("next_attempt_at")
    if connection.vendor == "postgresql":
        with transaction.atomic():
            rows = list(
                candidates.select_for_update(skip_locked=True, of=("self",)).values_list(*_ORDER_FIELDS)[:limit]
            )
            return _claim_rows(_replay_in_order(rows), token, now, locked=True)
    ids = _replay_in_order(list(candidates.values_list(*_ORDER_FIELDS)[:limit]))
    return _claim_rows(ids, token, now, locked=False)


def deliveries_claim_due_batches(limit: int, size: int) -> list[tuple[list[str], str]]:
    """:func:`deliveries_claim_due` cut into batches for the send tasks: ``[(ids, claim)]``.

    An endpoint's replayed deliveries make one batch of their own, so one task sends them in
    log order; the others go ``size`` to a batch. A batch holds one claim: deliveries handed
    out again under their earlier queued claim go in batches of their own.
    """
    claimed = deliveries_claim_due(limit)
    if not claimed:
        return []
    replay_of = dict(
        Delivery.objects.filter(pk__in=[pk for pk, _ in claimed], origin=Delivery.Origin.REPLAY).values_list(
            "pk", "endpoint_id"
        )
    )
    replays: dict[tuple[Any, str], list[str]] = {}
    others: dict[str, list[str]] = {}
    for pk, claim in claimed:
        endpoint_id = replay_of.get(UUID(pk))
        if endpoint_id is None:
            others.setdefault(claim, []).append(pk)
        else:
            replays.setdefault((endpoint_id, claim), []).append(pk)
    batches = [(ids, claim) for (_, claim), ids in replays.items()]
    for claim, ids in others.items():
        batches += [(ids[start : start + size], claim) for start in range(0, len(ids), size)]
    return batches


_ORDER_FIELDS = ("pk", "endpoint_id", "next_attempt_at", "origin")
# Replayed deliveries of one endpoint sent by one task, one after the other: few enough that
# a receiver taking WEBHOOK_TIMEOUT on each still ends within the task's time limit.
REPLAY_CHAIN = max(1, settings.WEBHOOK_SEND_WINDOW // max(1, settings.WEBHOOK_TIMEOUT))


def _replay_in_order(rows: list[tuple[Any, ...]]) -> list[Any]:
    """The ids of ``rows`` (``_ORDER_FIELDS``, due order) to claim, keeping replays in log order.

    A replay's due times grow with the event log (txid, seq), so due order is log order;
    what could break it is another claimer sending an earlier part of the same replay in
    parallel. So an endpoint's replayed deliveries are taken only while none due before them
    waits for its first attempt or is being sent elsewhere, and at most REPLAY_CHAIN at a time
    (sent in one chain, see :func:`deliveries_send`). A replayed delivery that fails is
    retried on its schedule and no longer holds the later ones back.
    """
    replay_endpoints = {row[1] for row in rows if row[3] == Delivery.Origin.REPLAY}
    if not replay_endpoints:
        return [row[0] for row in rows]
    ours = [row[0] for row in rows]
    earliest_elsewhere = dict(
        Delivery.objects.filter(endpoint_id__in=replay_endpoints, origin=Delivery.Origin.REPLAY)
        .filter(Q(state=Delivery.State.PENDING, attempts=0) | Q(state=Delivery.State.SENDING))
        .exclude(pk__in=ours)
        .order_by()
        .values("endpoint_id")
        .annotate(first=Min("next_attempt_at"))
        .values_list("endpoint_id", "first")
    )
    taken: dict[Any, int] = {}
    allowed = []
    for pk, endpoint_id, due, origin in rows:
        if origin == Delivery.Origin.REPLAY:
            first = earliest_elsewhere.get(endpoint_id)
            if (first is not None and first < due) or taken.get(endpoint_id, 0) >= REPLAY_CHAIN:
                continue  # its turn comes after the earlier ones
            taken[endpoint_id] = taken.get(endpoint_id, 0) + 1
        allowed.append(pk)
    return allowed


def _claim_locked(
    candidates: QuerySet[Delivery], limit: int, token: str, now: datetime, *, plain_index_scan: bool = False
) -> list[str]:
    """PostgreSQL: lock up to ``limit`` of ``candidates`` (``SKIP LOCKED``, so concurrent
    claimers take disjoint rows) and start them under ``token`` (their attempt begins now);
    the claimed ids."""
    with transaction.atomic():
        if plain_index_scan:
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL enable_bitmapscan = off")
        rows = list(candidates.select_for_update(skip_locked=True, of=("self",)).values_list(*_ORDER_FIELDS)[:limit])
        ids = _replay_in_order(rows)
        if ids:
            Delivery.objects.filter(pk__in=ids).update(**_claim_values(token, now, start=True))
    return [str(pk) for pk in ids]


@dataclass(frozen=True)
class Outcome:
    succeeded: bool
    status: int | None
    error: str
    body: str
    retry_after: str | None
    duration_ms: int


def event_body(delivery: Delivery) -> bytes:
    """The webhook body: the event's contract JSON, byte-identical on every attempt."""
    return json.dumps(delivery.event.as_json(), separators=(",", ":"), ensure_ascii=False).encode()


def request_headers(delivery: Delivery, body: bytes, timestamp: int, active: list[str]) -> dict[str, str]:
    """Standard Webhooks headers; one signature per active secret."""
    message_id = delivery.event.public_id
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(active, message_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def _attempt(delivery: Delivery, active_secrets: list[str]) -> Outcome:
    body = event_body(delivery)
    headers = request_headers(delivery, body, int(time.time()), active_secrets)
    started = time.monotonic()
    try:
        # Resolved and checked again on every attempt: DNS may have changed since creation.
        target = transport.url_resolve(delivery.endpoint.url)
        response = transport.post(target, body, headers, timeout=settings.WEBHOOK_TIMEOUT)
    except transport.UrlRefused as exc:
        metrics.REFUSED.inc()
        return Outcome(False, None, f"refused: {exc}"[:500], "", None, 0)
    except transport.TransportError as exc:
        duration = time.monotonic() - started
        metrics.ATTEMPT_SECONDS.observe(duration)
        return Outcome(False, None, str(exc)[:500], "", None, int(duration * 1000))
    duration = time.monotonic() - started
    metrics.ATTEMPT_SECONDS.observe(duration)
    status = response.status
    error = ""
    if 300 <= status < 400:
        error = f"redirect ({status}) not followed"
    elif not 200 <= status < 300:
        error = f"HTTP {status}"
    return Outcome(
        succeeded=200 <= status < 300,
        status=status,
        error=error,
        body=response.body.decode("utf-8", "replace")[:1024],
        retry_after=response.headers.get("retry-after") if status in (429, 503) else None,
        duration_ms=int(duration * 1000),
    )


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
HTTP_THREADS = 64


def _http_pool() -> ThreadPoolExecutor:
    """Threads for the HTTP requests only (no database work), shared by the process's tasks
    so a batch does not pay for starting threads."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=HTTP_THREADS, thread_name_prefix="webhook-http")
        return _pool


def deliveries_claim(delivery_ids: list[str], *, along: int = 0) -> tuple[str, list[str]] | None:
    """Claim those of ``delivery_ids`` that are due, or with ``along``, the oldest due pending
    deliveries, as many as ``delivery_ids`` plus ``along``.

    Returns the claim token and every claimed id, or None. Taking due deliveries along
    (PostgreSQL: ``SKIP LOCKED``, oldest due first, so the task's own are among them unless
    older ones wait) turns a stream of one-delivery tasks into batches under load: a task
    takes what the tasks queued before it left, and the later tasks whose deliveries it
    took find nothing and end at once. Expired leases are the beat dispatcher's.
    """
    now = clock.now()
    token = secrets.token_hex(8)
    if along and connection.vendor == "postgresql":
        pending = Delivery.objects.filter(
            state=Delivery.State.PENDING, next_attempt_at__lte=now, endpoint__enabled=True
        ).order_by("next_attempt_at")
        # The head of a queue table: every delivery leaves index entries behind in "pending"
        # that only VACUUM removes. A bitmap scan visits all of them on every claim; a plain
        # index scan in next_attempt_at order marks them dead as it passes (kill_prior_tuple),
        # so the next claim skips them.
        ids = _claim_locked(pending, len(delivery_ids) + along, token, now, plain_index_scan=True)
        return (token, ids) if ids else None
    rows = list(
        Delivery.objects.filter(_due(now), pk__in=delivery_ids, endpoint__enabled=True)
        .order_by("next_attempt_at")
        .values_list(*_ORDER_FIELDS)
    )
    ids = _replay_in_order(rows)
    claimed = (
        Delivery.objects.filter(_due(now), pk__in=ids).update(**_claim_values(token, now, start=True)) if ids else 0
    )
    return (token, [str(pk) for pk in ids]) if claimed else None


def deliveries_start(delivery_ids: list[str], claim: str) -> str | None:
    """Start the deliveries of ``delivery_ids`` held under the queued ``claim``: their HTTP
    attempt begins now. Counts the attempt, renews the lease from now and swaps the claim
    for a started one, so another copy of the same task (handed out again while this one
    waited in the broker) finds them taken. The started claim, or None if none was ours."""
    now = clock.now()
    token = secrets.token_hex(8)
    started = Delivery.objects.filter(pk__in=delivery_ids, claim=claim, state=Delivery.State.SENDING).update(
        **_claim_values(token, now, start=True)
    )
    return token if started else None


def deliveries_send(delivery_ids: list[str], claim: str | None = None, *, along: int = 0) -> list[Delivery]:
    """One attempt of each delivery in ``delivery_ids`` held under ``claim`` (claimed here if None,
    with up to ``along`` other due deliveries, see :func:`deliveries_claim`).

    The HTTP requests run in parallel threads (no database work there); the outcomes are
    recorded together in one transaction. Deliveries not ours to send (already delivered,
    not due, claimed by someone else, endpoint disabled) are skipped.
    """
    if claim is None:
        claimed = deliveries_claim(delivery_ids, along=along)
        if claimed is None:
            return []
        claim, delivery_ids = claimed
    elif claim.startswith(QUEUED):
        started = deliveries_start(delivery_ids, claim)
        if started is None:
            return []
        claim = started
    deliveries = list(
        Delivery.objects.select_related("endpoint", "event").filter(
            pk__in=delivery_ids, claim=claim, state=Delivery.State.SENDING
        )
    )
    if not deliveries:
        return []
    secrets_by_endpoint: dict[UUID, list[str]] = {}
    for delivery in deliveries:
        endpoint = delivery.endpoint
        if endpoint.pk not in secrets_by_endpoint:
            secrets_by_endpoint[endpoint.pk] = services.endpoint_active_secrets(endpoint)

    def attempt(delivery: Delivery) -> Outcome:
        if delivery.attempts > MAX_ATTEMPTS:
            # Claimed again after its workers died mid-request too often.
            return Outcome(False, None, "abandoned: the worker was lost during every attempt", "", None, 0)
        return _attempt(delivery, secrets_by_endpoint[delivery.endpoint_id])

    # Deliveries to one endpoint about one message go one after the other, in log order
    # (ingest.received before objectstore.uploaded), and so do the replayed deliveries of an
    # endpoint (docs/webhooks.md, "Replay"); everything else in parallel.
    # Log order is (txid, seq); a replay's due times follow it.
    deliveries.sort(key=lambda d: (d.event.txid or 0, d.event_id))
    chains: dict[tuple[UUID, object], list[Delivery]] = {}
    for delivery in deliveries:
        if delivery.origin == Delivery.Origin.REPLAY:
            chain_key: object = Delivery.Origin.REPLAY
        else:
            chain_key = delivery.event.message_id or delivery.pk
        chains.setdefault((delivery.endpoint_id, chain_key), []).append(delivery)

    def send_chain(chain: list[Delivery]) -> list[Outcome]:
        return [attempt(delivery) for delivery in chain]

    ordered = [delivery for chain in chains.values() for delivery in chain]
    if len(chains) == 1:
        outcomes = send_chain(ordered)
    else:
        outcomes = [outcome for chain in _http_pool().map(send_chain, chains.values()) for outcome in chain]
    _record(ordered, claim, outcomes)
    return ordered


def delivery_send(delivery_id: UUID | str, claim: str | None = None) -> Delivery | None:
    """One attempt of one delivery; the delivery after recording, or None if not ours to send."""
    sent = deliveries_send([str(delivery_id)], claim)
    return sent[0] if sent else None


def _record(deliveries: list[Delivery], claim: str, outcomes: list[Outcome]) -> None:
    now = clock.now()
    with transaction.atomic(), services.endpoints_cached():
        Attempt.objects.bulk_create(
            Attempt(
                delivery=delivery,
                number=delivery.attempts,
                started_at=now,
                duration_ms=outcome.duration_ms,
                status_code=outcome.status,
                response_body=outcome.body,
                error=outcome.error,
                succeeded=outcome.succeeded,
            )
            for delivery, outcome in zip(deliveries, outcomes, strict=True)
        )
        succeeded = [(d, o) for d, o in zip(deliveries, outcomes, strict=True) if o.succeeded]
        by_status: dict[int | None, list[UUID]] = {}
        for delivery, outcome in succeeded:
            by_status.setdefault(outcome.status, []).append(delivery.pk)
        for status, ids in by_status.items():
            Delivery.objects.filter(pk__in=ids, claim=claim, state=Delivery.State.SENDING).update(
                state=Delivery.State.DELIVERED,
                delivered_at=now,
                last_error="",
                claim="",
                lease_until=None,
                last_status=status,
                updated_at=now,
            )
        recovered = {d.endpoint_id for d, _ in succeeded if d.endpoint.failing_since is not None}
        if recovered:
            Endpoint.objects.filter(pk__in=recovered).update(failing_since=None)
        delivered: list[EventSpec] = []
        for delivery, outcome in succeeded:
            delivery.state = Delivery.State.DELIVERED
            if not delivery.event.type.startswith(services.WEBHOOK_EVENT_PREFIX):
                delivered.append(
                    _event_spec(delivery, "webhook.delivered", status=outcome.status, attempts=delivery.attempts)
                )
        # One INSERT (and one fan-out) for the batch's webhook.delivered events, in its order.
        events_record(delivered)
        if succeeded:
            metrics.DELIVERIES.labels(outcome="delivered").inc(len(succeeded))
        for delivery, outcome in zip(deliveries, outcomes, strict=True):
            if not outcome.succeeded:
                _record_failure(delivery, claim, outcome, now)


def _record_failure(delivery: Delivery, claim: str, outcome: Outcome, now: datetime) -> None:
    """Schedule the next attempt, or give up (dead, ``webhook.failed``); 410 disables."""
    endpoint = delivery.endpoint
    about_webhooks = delivery.event.type.startswith(services.WEBHOOK_EVENT_PREFIX)
    mine = Delivery.objects.filter(pk=delivery.pk, claim=claim, state=Delivery.State.SENDING)
    common = {"claim": "", "lease_until": None, "last_status": outcome.status, "updated_at": now}
    Endpoint.objects.filter(pk=endpoint.pk, failing_since__isnull=True).update(failing_since=now)
    failing_since = endpoint.failing_since or now
    gone = outcome.status == 410
    delay = None if gone else retry_delay(delivery.attempts)
    honoured = retry_after_seconds(outcome.retry_after, now)
    if delay is not None and honoured is not None:
        delay = honoured
    if delay is not None:
        mine.update(
            state=Delivery.State.PENDING,
            next_attempt_at=now + timedelta(seconds=delay),
            last_error=outcome.error,
            **common,
        )
        delivery.state = Delivery.State.PENDING
        metrics.DELIVERIES.labels(outcome="retrying").inc()
    else:
        reason = "the endpoint answered 410 Gone" if gone else f"gave up after {delivery.attempts} attempts"
        if mine.update(state=Delivery.State.DEAD, last_error=(outcome.error or reason)[:500], **common):
            delivery.state = Delivery.State.DEAD
            metrics.DELIVERIES.labels(outcome="dead").inc()
            if not about_webhooks:
                _event(delivery, "webhook.failed", status=outcome.status, attempts=delivery.attempts, reason=reason)
    if gone:
        services.endpoint_disable(endpoint=endpoint, reason="The endpoint answered 410 Gone.")
    elif (now - failing_since).total_seconds() >= settings.WEBHOOK_DISABLE_AFTER:
        days = settings.WEBHOOK_DISABLE_AFTER / 86400
        services.endpoint_disable(
            endpoint=endpoint, reason=f"Every delivery failed for {days:g} days; last error: {outcome.error}."
        )


def _event_spec(delivery: Delivery, type: str, **data: object) -> EventSpec:
    event = delivery.event
    return EventSpec(
        tenant_id=delivery.tenant_id,
        type=type,
        trace_id=event.trace_id,
        data={
            "endpoint": str(delivery.endpoint_id),
            "delivery": str(delivery.pk),
            "event": event.public_id,
            "event_type": event.type,
            **data,
        },
    )


def _event(delivery: Delivery, type: str, **data: object) -> None:
    events_record([_event_spec(delivery, type, **data)])
