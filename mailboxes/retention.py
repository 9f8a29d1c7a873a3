"""The sweepers: stuck messages, retention, temporary mailbox expiry, blob purging.

All are driven by the database (DESIGN section 3 step 5): a lost broker message delays
work but never loses it. Each run handles a bounded batch, so a large backlog drains over
several beats instead of one task running past its time limit.

Deleting a message is two steps: a soft delete (``deleted_at``, state ``deleted``, event
``message.deleted``) that hides it at once, then :func:`messages_purge` removing its blobs
(raw and attachments, unless another live message still references the same
content-addressed object) and wiping its content, leaving a tombstone row. Deleting a
mailbox takes the same path (:func:`mailbox_messages_soft_delete`; the rows outlive the
mailbox with ``mailbox`` NULL until they are purged), so no blob is ever orphaned.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from uuid import UUID

from django.db import transaction
from django.db.models import Min, Q
from django.utils import timezone
from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from audit.services import event_record
from mailboxes import blobs
from mailboxes.models import Attachment, Mailbox, Message

logger = logging.getLogger(__name__)

STUCK_AFTER = timedelta(minutes=2)
# While a queue holds messages, a stuck message may be waiting in it: only one this old is
# enqueued again then, so a queue that never empties still cannot hide a lost one for long.
STUCK_BEHIND_BACKLOG_AFTER = timedelta(minutes=30)
BATCH = 500
REQUEUE_BATCH = 32  # stored messages a re-enqueued parse task takes (as a drained spool batch)
# A raw object written this recently may belong to a delivery whose row is not committed
# yet (the drainer PUTs before it inserts), so it is never deleted.
RECENT_BLOB = timedelta(hours=1)

SWEPT = Gauge("mailboxes_sweeper_requeued", "Messages re-enqueued by the last stuck sweep", ["state"])
BACKLOG = Gauge(
    "mailboxes_sweeper_queue_waiting", "Messages waiting in the queue at the last stuck sweep (-1: unknown)", ["queue"]
)


def messages_stuck_requeue(
    *,
    older_than: timedelta = STUCK_AFTER,
    behind_backlog_after: timedelta = STUCK_BEHIND_BACKLOG_AFTER,
    limit: int = BATCH,
) -> dict[str, int]:
    """Re-enqueue ``stored``/``parsed`` messages untouched for ``older_than``; returns counts.

    Only what no task holds: while the state's queue (``parse``, ``index``) still has
    messages waiting, a message may be one of them, so only those untouched for
    ``behind_backlog_after`` are enqueued again; and a row a worker is writing (locked) is
    skipped (PostgreSQL ``SKIP LOCKED``). The sweep claims its messages with one locking
    SELECT and one UPDATE bumping ``state_changed_at`` (so the next sweep waits again and two
    sweepers never enqueue the same message twice), and sends stored ones as
    ``messages_parse`` batches of :data:`REQUEUE_BATCH`, one broker message each.
    """
    from django.conf import settings

    from mailboxes.tasks import message_index, messages_parse
    from mailplatform.enqueue import TasksEnqueue
    from mailplatform.queues import queue_waiting

    now = timezone.now()
    counts = {}
    for state, task in ((Message.State.STORED, messages_parse), (Message.State.PARSED, message_index)):
        queue = settings.CELERY_TASK_ROUTES[task.name]["queue"]
        waiting = queue_waiting(queue)
        cutoff = now - (behind_backlog_after if waiting else older_than)
        BACKLOG.labels(queue).set(-1 if waiting is None else waiting)
        with transaction.atomic():
            claimed = [
                str(pk)
                for pk in Message.objects.select_for_update(skip_locked=True)
                .filter(state=state, state_changed_at__lt=cutoff)
                .order_by("state_changed_at")
                .values_list("pk", flat=True)[:limit]
            ]
            if claimed:
                Message.objects.filter(pk__in=claimed, state=state).update(state_changed_at=timezone.now())
        enqueue = TasksEnqueue(task)
        if state == Message.State.STORED:
            for start in range(0, len(claimed), REQUEUE_BATCH):
                enqueue.add(claimed[start : start + REQUEUE_BATCH])
        else:
            for message_id in claimed:
                enqueue.add(message_id)
        enqueue()  # never raises: what it could not send is stored or parsed still, for the next sweep
        counts[str(state)] = len(claimed)
        SWEPT.labels(str(state)).set(len(claimed))
    return counts


def message_soft_delete(message: Message, *, reason: str) -> bool:
    """Hide a message now (its blobs go with the next purge); records ``message.deleted``."""
    with transaction.atomic():
        now = timezone.now()
        updated = Message.objects.filter(pk=message.pk, deleted_at__isnull=True).update(
            deleted_at=now, state=Message.State.DELETED, state_changed_at=now, state_reason=reason[:500]
        )
        if updated:
            event_record(
                tenant_id=message.tenant_id,
                type="message.deleted",
                data={"reason": reason},
                trace_id=message.trace_id,
                mailbox_id=message.mailbox_id,
                message_id=message.pk,
            )
    return bool(updated)


def mailbox_messages_soft_delete(*, mailbox_id: UUID, reason: str) -> int:
    """Hide every live message of a mailbox in one UPDATE (the mailbox is going away).

    One ``mailbox.deleted`` event stands for them (no ``message.deleted`` per message, which
    could be a hundred thousand); their blobs go with the next purge like any deleted message.
    """
    now = timezone.now()
    return Message.objects.filter(mailbox_id=mailbox_id, deleted_at__isnull=True).update(
        deleted_at=now, state=Message.State.DELETED, state_changed_at=now, state_reason=reason[:500]
    )


def messages_retention_apply(*, limit: int = BATCH) -> int:
    """Soft-delete messages older than their mailbox's, else their tenant's, retention."""
    now = timezone.now()
    deleted = 0
    mailboxes = Mailbox.objects.filter(Q(retention_days__isnull=False) | Q(tenant__retention_days__isnull=False))
    for mailbox_id, own_days, tenant_days in mailboxes.values_list("pk", "retention_days", "tenant__retention_days"):
        days = own_days if own_days is not None else tenant_days
        if not days:
            continue
        expired = Message.objects.filter(
            mailbox_id=mailbox_id, deleted_at__isnull=True, received_at__lt=now - timedelta(days=days)
        ).only("pk", "tenant_id", "mailbox_id", "trace_id")[: limit - deleted]
        for message in expired:
            deleted += message_soft_delete(message, reason="retention")
        if deleted >= limit:
            break
    return deleted


def mailboxes_expire(*, limit: int = 50) -> int:
    """Remove temporary mailboxes past ``expires_at`` with their mail and blobs (``mailbox.expired``)."""
    expired = 0
    candidates = Mailbox.objects.filter(kind=Mailbox.Kind.TEMPORARY, expires_at__lte=timezone.now())[:limit]
    for mailbox in candidates:
        messages = list(Message.objects.filter(mailbox=mailbox, purged_at__isnull=True).values_list("pk", flat=True))
        for message_id in messages:
            _message_purge(message_id)
        with transaction.atomic():
            # Purged above: nothing of them is left to keep (messages no longer cascade).
            Message.objects.filter(mailbox=mailbox).delete()
            event_record(
                tenant_id=mailbox.tenant_id,
                type="mailbox.expired",
                data={"address": mailbox.address, "messages": len(messages)},
                domain_id=mailbox.domain_id,
                mailbox_id=mailbox.pk,
            )
            mailbox.delete()
        expired += 1
    return expired


def _referenced_elsewhere(key: str, message_id: UUID) -> bool:
    live = Q(purged_at__isnull=True) & ~Q(pk=message_id)
    if key.startswith("att/"):
        return (
            Attachment.objects.filter(storage_key=key)
            .exclude(message_id=message_id)
            .filter(message__purged_at__isnull=True)
            .exists()
        )
    return Message.objects.filter(live, storage_key=key).exists()


def _recently_written(key: str) -> bool:
    try:
        modified = blobs.blob_storage().get_modified_time(key)
    except Exception:
        return False  # gone already, or the backend cannot say
    return modified > timezone.now() - RECENT_BLOB


def _message_purge(message_id: UUID) -> None:
    message = Message.objects.filter(pk=message_id).only("pk", "storage_key").first()
    if message is None:
        return
    keys = [
        message.storage_key,
        *Attachment.objects.filter(message_id=message_id).values_list("storage_key", flat=True),
    ]
    for key in dict.fromkeys(keys):
        if not key or _referenced_elsewhere(key, message_id):
            continue
        if key.startswith("raw/") and _recently_written(key):
            continue
        try:
            blobs.blob_delete(key)
        except Exception as exc:
            logger.warning("blob delete of %s failed: %s", key, type(exc).__name__)
            raise
    with transaction.atomic():
        Attachment.objects.filter(message_id=message_id).delete()
        Message.objects.filter(pk=message_id).update(
            purged_at=timezone.now(),
            text="",
            html="",
            stripped_text="",
            headers=[],
            codes=[],
            links=[],
            search_vector=None,
        )


def messages_purge(*, limit: int = BATCH) -> int:
    """Remove the blobs of soft-deleted messages and wipe their content; returns how many."""
    ids = list(
        Message.objects.filter(deleted_at__isnull=False, purged_at__isnull=True)
        .order_by("deleted_at")
        .values_list("pk", flat=True)[:limit]
    )
    for message_id in ids:
        _message_purge(message_id)
    return len(ids)


class IndexLagCollector(Collector):
    """``mailboxes_index_lag_seconds``: age of the oldest message not yet indexed, at scrape time."""

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "mailboxes_index_lag_seconds", "Age of the oldest message in state stored or parsed (0 when none)"
        )

    def describe(self):  # type: ignore[no-untyped-def]
        # Registration asks for the names through describe(); without it, it would query now.
        yield self._family()

    def collect(self):  # type: ignore[no-untyped-def]
        gauge = self._family()
        try:
            oldest = Message.objects.filter(state__in=[Message.State.STORED, Message.State.PARSED]).aggregate(
                oldest=Min("received_at")
            )["oldest"]
        except Exception:
            return  # the database is down: /readyz says so; no made-up value here
        gauge.add_metric([], max(0.0, (timezone.now() - oldest).total_seconds()) if oldest else 0.0)
        yield gauge


_registered = False


def index_lag_metric_register() -> None:
    global _registered
    if not _registered:
        REGISTRY.register(IndexLagCollector())
        _registered = True
