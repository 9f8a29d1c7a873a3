"""The copy IMAP and POP3 serve of a message, settled once (RFC 3501 section 2.3.1.1: the
content under a UID never changes).

A message is served once its parse has verified it: the verdict's ``presented`` says what the
copy changes (our Authentication-Results first, forged ones left out). Until then IMAP and
POP3 show only the messages of a mailbox below its lowest UID still awaiting its parse
(``mailaccess.store.visible``), so UIDs still appear in ascending order. A message stuck
unparsed (the worker down, clamd holding it) would hold back every later one: past
:data:`UNVERIFIED_SHOWN_AFTER` the stuck sweeper settles its copy without a verdict (the
fields claiming our authserv-id left out, nothing put first) in ``Message.imap_presentation``,
and the parse that comes later keeps that copy.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from uuid import UUID

from django.db import transaction
from django.utils import timezone
from prometheus_client import Counter

from mailboxes.authentication import presentation_unverified
from mailboxes.models import Message
from mailboxes.pipeline import RawMissing, raw_read
from mailboxes.waiting import folder_wake_publish

logger = logging.getLogger(__name__)

# Long enough for a parse behind a busy queue (p95 250-to-indexed is seconds) and for the
# parse task's first retries; short enough that one stuck message does not hide a mailbox
# from its mail client for long.
UNVERIFIED_SHOWN_AFTER = timedelta(minutes=10)
BATCH = 200

SHOWN_UNVERIFIED = Counter(
    "mailboxes_shown_unverified_total", "Messages IMAP and POP3 serve without a verdict: stuck unparsed"
)


def messages_unverified_settle(*, older_than: timedelta = UNVERIFIED_SHOWN_AFTER, limit: int = BATCH) -> int:
    """Settle the copy of each message still ``stored`` (unparsed) after ``older_than``, so IMAP
    and POP3 show it and the ones after it; returns how many. A message whose raw object
    cannot be read now waits for the next sweep (its parse quarantines it if it is gone)."""
    cutoff = timezone.now() - older_than
    due = list(
        Message.objects.filter(
            state=Message.State.STORED,
            imap_presentation__isnull=True,
            created_at__lt=cutoff,
            mailbox__isnull=False,
            uid__isnull=False,
        )
        .order_by("mailbox_id", "uid")
        .values_list("pk", flat=True)[:limit]
    )
    settled = 0
    for message_id in due:
        try:
            settled += message_unverified_settle(message_id=message_id)
        except RawMissing:
            continue
        except Exception as exc:  # blob storage away: the next sweep tries again
            logger.warning("unverified copy of %s not settled: %s", message_id, type(exc).__name__)
    return settled


def message_unverified_settle(*, message_id: UUID | str) -> bool:
    """Settle one unparsed message's copy (see :func:`messages_unverified_settle`); False if
    it was parsed, quarantined or deleted meanwhile (its row lock orders it with the parse)."""
    message = Message.objects.filter(pk=message_id).only("pk", "storage_key").first()
    if message is None:
        return False
    presentation = presentation_unverified(raw_read(message))  # outside the lock
    with transaction.atomic():
        claimed = (
            Message.objects.select_for_update()
            .filter(pk=message_id, state=Message.State.STORED, imap_presentation__isnull=True, mailbox__isnull=False)
            .only("pk", "tenant_id", "mailbox_id", "trace_id")
            .first()
        )
        if claimed is None or claimed.mailbox_id is None:
            return False
        Message.objects.filter(pk=claimed.pk).update(imap_presentation=presentation)
        folder_wake_publish(tenant_id=claimed.tenant_id, mailbox_id=claimed.mailbox_id)
    SHOWN_UNVERIFIED.inc()
    logger.warning("%s shown over IMAP and POP3 unparsed", message_id, extra={"trace_id": claimed.trace_id})
    return True
