"""Celery tasks for webhooks (queue ``webhooks``): thin, take ids, idempotent."""

from __future__ import annotations

from celery import shared_task

from webhooks import delivery

# Longer than one attempt (WEBHOOK_TIMEOUT, at most 60 s) plus recording it.
_LIMITS = {"soft_time_limit": 75, "time_limit": 90}


@shared_task(acks_late=True, ignore_result=True, **_LIMITS)
def delivery_send(delivery_id: str, claim: str | None = None) -> None:
    """One attempt of one delivery; a no-op if it is not due or someone else holds it."""
    delivery.delivery_send(delivery_id, claim)


@shared_task(acks_late=True, ignore_result=True, soft_time_limit=30, time_limit=45)
def deliveries_dispatch(limit: int = 500) -> int:
    """Beat: claim due deliveries (new, retries, expired leases) and hand each to a worker."""
    claimed = delivery.deliveries_claim_due(limit)
    for delivery_id, claim in claimed:
        delivery_send.delay(delivery_id, claim)
    return len(claimed)
