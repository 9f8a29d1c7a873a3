"""Celery tasks of outbound mail (queue ``outbound``); thin, idempotent, ids only.

The database says what is pending: ``recipients_due_dispatch`` (beat, every few seconds)
re-enqueues any message with a recipient due whose claim is free or ran out, so a lost
broker message or a worker killed mid-delivery delays mail but never loses it.
"""

from __future__ import annotations

import logging
from uuid import UUID

from celery import shared_task
from django.conf import settings

from mailplatform.enqueue import CoalescedEnqueue
from outbound import bounces, delivery, sent
from outbound.services import counters_prune

logger = logging.getLogger(__name__)


@shared_task(
    name="outbound.tasks.message_deliver",
    acks_late=True,
    ignore_result=True,
    soft_time_limit=300,
    time_limit=360,
)
def message_deliver(message_id: str, sent_copy: bool = False) -> None:
    """Deliver the due recipients of one outbound message and, up to OUTBOUND_BATCH in all,
    other due recipients (outbound/delivery.py): in a burst the first tasks take most of the
    queue, the later ones find their message's recipients already taken.

    With ``sent_copy`` (the sender is a mailbox) the same task then files the sent copy, so
    a send costs its web process one enqueue, not two; a copy that cannot be stored now
    (blob storage down) is left to :func:`sent_copy_store` and its retries."""
    delivery.message_deliver(UUID(message_id), along=settings.OUTBOUND_BATCH - 1)
    if sent_copy:
        _sent_copy(message_id)


@shared_task(
    name="outbound.tasks.messages_deliver",
    acks_late=True,
    ignore_result=True,
    soft_time_limit=300,
    time_limit=360,
)
def messages_deliver(messages: list[tuple[str, bool]]) -> None:
    """:func:`message_deliver` for several messages at once, each ``(id, sent_copy)``: the
    sends of many requests in one broker message (:data:`deliveries_enqueue`); up to
    OUTBOUND_BATCH recipients in all are claimed, the named messages' first."""
    ids = [UUID(message_id) for message_id, _ in messages]
    delivery.messages_deliver(ids, along=settings.OUTBOUND_BATCH - len(ids))
    for message_id, sent_copy in messages:
        if sent_copy:
            _sent_copy(message_id)


def _sent_copy(message_id: str) -> None:
    try:
        sent.sent_copy_store(UUID(message_id))
    except OSError as exc:
        logger.warning("outbound %s: sent copy not stored yet (%s), retrying", message_id, type(exc).__name__)
        sent_copy_store.delay(message_id)


# What message_queue hands over after its commit: one messages_deliver task per batch of
# sends gathered in this process, instead of one task (and one broker round trip) per send.
deliveries_enqueue = CoalescedEnqueue(lambda: messages_deliver, lambda: settings.OUTBOUND_BATCH)


@shared_task(name="outbound.tasks.recipients_due_dispatch", ignore_result=True, soft_time_limit=60, time_limit=90)
def recipients_due_dispatch() -> int:
    counters_prune()
    due = delivery.recipients_due()
    size = settings.OUTBOUND_BATCH
    for start in range(0, len(due), size):
        messages_deliver.delay([(message_id, False) for message_id in due[start : start + size]])
    return len(due)


@shared_task(
    name="outbound.tasks.sent_copy_store",
    acks_late=True,
    ignore_result=True,
    autoretry_for=(OSError,),
    retry_backoff=True,
    max_retries=8,
)
def sent_copy_store(message_id: str) -> None:
    """The sent copy in the sender's mailbox (outbound/sent.py)."""
    sent.sent_copy_store(UUID(message_id))


@shared_task(
    name="outbound.tasks.bounce_process",
    acks_late=True,
    ignore_result=True,
    autoretry_for=(OSError,),
    retry_backoff=True,
    max_retries=8,
)
def bounce_process(message_id: str) -> None:
    """A DSN stored in the bounce mailbox, applied to its recipient (outbound/bounces.py)."""
    bounces.bounce_process(message_id)
