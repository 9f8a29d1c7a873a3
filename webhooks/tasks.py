"""Celery tasks for webhooks (queue ``webhooks``): thin, take ids, idempotent."""

from __future__ import annotations

from celery import shared_task

from webhooks import delivery

# Longer than one attempt (WEBHOOK_TIMEOUT, at most 60 s; a batch's requests run in parallel)
# plus recording it.
_LIMITS = {"soft_time_limit": 75, "time_limit": 90}
BATCH = 50


@shared_task(acks_late=True, ignore_result=True, **_LIMITS)
def deliveries_send(delivery_ids: list[str], claim: str | None = None) -> None:
    """One attempt of each delivery; those not due or held by someone else are skipped.

    Unclaimed (enqueued on commit), it takes other due deliveries along, up to a batch."""
    delivery.deliveries_send(delivery_ids, claim, along=0 if claim else max(0, BATCH - len(delivery_ids)))


@shared_task(acks_late=True, ignore_result=True, soft_time_limit=30, time_limit=45)
def deliveries_dispatch(limit: int = 500) -> int:
    """Beat: claim due deliveries (new, retries, expired leases) and hand them to workers."""
    claimed = delivery.deliveries_claim_due(limit)
    for start in range(0, len(claimed), BATCH):
        chunk = claimed[start : start + BATCH]
        deliveries_send.delay([delivery_id for delivery_id, _ in chunk], chunk[0][1])
    return len(claimed)
