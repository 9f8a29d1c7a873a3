"""Celery tasks for webhooks (queue ``webhooks``): thin, take ids, idempotent."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from mailplatform.enqueue import TasksEnqueue
from webhooks import delivery
from webhooks.models import Delivery

# Longer than the attempts (WEBHOOK_SEND_WINDOW) plus recording them; shorter than the lease
# of the claims the task holds (WEBHOOK_LEASE), so no attempt is handed out twice at once.
_LIMITS = {"soft_time_limit": settings.WEBHOOK_TASK_SOFT_TIME_LIMIT, "time_limit": settings.WEBHOOK_TASK_TIME_LIMIT}
BATCH = 50


@shared_task(acks_late=True, ignore_result=True, **_LIMITS)
def deliveries_send(delivery_ids: list[str], claim: str | None = None) -> None:
    """One attempt of each delivery; those not due or held by someone else are skipped.

    Unclaimed (enqueued on commit), it takes other due deliveries along, up to a batch."""
    sent = delivery.deliveries_send(delivery_ids, claim, along=0 if claim else max(0, BATCH - len(delivery_ids)))
    if any(each.origin == Delivery.Origin.REPLAY for each in sent):
        # A replay goes out a few deliveries per endpoint at a time, in log order: the next
        # ones are claimed as soon as these are done, not at the next beat.
        next_round = TasksEnqueue(deliveries_dispatch)
        next_round.add()
        next_round()


@shared_task(acks_late=True, ignore_result=True, soft_time_limit=30, time_limit=45)
def deliveries_dispatch(limit: int = 500) -> int:
    """Beat: claim due deliveries (new, retries, expired leases) and hand them to workers."""
    batches = delivery.deliveries_claim_due_batches(limit, BATCH)
    for ids, claim in batches:
        deliveries_send.delay(ids, claim)
    return sum(len(ids) for ids, _ in batches)
