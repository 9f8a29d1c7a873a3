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

Verdicts stored before IMAP and POP3 presented them lack ``presented``: those messages were
served as stored. :func:`messages_presentation_backfill` (migration 0016) works their copy out
and, since it is not the one clients were given, numbers them again (new UIDs at the top of
their mailbox: clients see the old ones expunged and the new copies arrive).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from prometheus_client import Counter

from mailboxes import blobs
from mailboxes.authentication import presentation_of, presentation_unverified
from mailboxes.models import Mailbox, Message
from mailboxes.pipeline import RawMissing, raw_read
from mailboxes.uids import mailbox_uids_take
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


# --- Verdicts stored before their presentation --------------------------------------------
BACKFILL_BATCH = 500


def messages_presentation_backfill(
    *, batch: int = BACKFILL_BATCH, message_model: Any = Message, mailbox_model: Any = Mailbox
) -> int:
    """Give every live message whose verdict lacks ``presented`` its presentation (our
    Authentication-Results first, forged ones left out) and a new UID; returns how many.

    A new UID, because its bytes change: the content under a UID never does (RFC 3501 section
    2.3.1.1). Batches of ``batch`` messages in mailbox and UID order (so they keep their order
    under the new UIDs; one renumbered has ``presented`` and is not taken again), each read
    from blob storage outside any transaction, then written in one transaction that locks
    their mailboxes (in id order, as the drainers do) and the rows, still lacking
    ``presented``. A message whose raw object cannot be read is left as it is (served as
    stored). The model arguments let the migration pass its historical models.
    """
    done = 0
    last: tuple[UUID, int] | None = None
    while True:
        pending = (
            message_model.objects.filter(
                state__in=[Message.State.PARSED, Message.State.INDEXED],  # what IMAP and POP3 serve
                authentication__isnull=False,
                imap_presentation__isnull=True,
                uid__isnull=False,
                mailbox__isnull=False,
                deleted_at__isnull=True,
            )
            .exclude(authentication__has_key="presented")
            .order_by("mailbox_id", "uid")
        )
        if last is not None:
            pending = pending.filter(Q(mailbox_id__gt=last[0]) | Q(mailbox_id=last[0], uid__gt=last[1]))
        found = list(pending.only("pk", "mailbox_id", "uid", "storage_key", "authentication")[:batch])
        if not found:
            return done
        last = (found[-1].mailbox_id, found[-1].uid)
        worked: dict[UUID, dict[str, Any]] = {}
        for message in found:
            header = (message.authentication or {}).get("header")
            if not header:
                continue
            try:
                worked[message.pk] = presentation_of(blobs.blob_get(message.storage_key), str(header))
            except Exception as exc:
                logger.warning("presentation of %s not backfilled: %s", message.pk, type(exc).__name__)
        if worked:
            done += _presentations_write(worked, message_model, mailbox_model)


def _presentations_write(worked: dict[UUID, dict[str, Any]], message_model: Any, mailbox_model: Any) -> int:
    written = 0
    with transaction.atomic():
        mailbox_ids = sorted(
            set(message_model.objects.filter(pk__in=list(worked)).values_list("mailbox_id", flat=True)) - {None}
        )
        list(mailbox_model.objects.select_for_update().filter(pk__in=mailbox_ids).order_by("pk").values_list("pk"))
        rows = (
            message_model.objects.select_for_update()
            .filter(pk__in=list(worked), uid__isnull=False, mailbox__isnull=False, deleted_at__isnull=True)
            .only("pk", "tenant_id", "mailbox_id", "uid", "authentication")
            .order_by("pk")
        )
        by_mailbox: dict[UUID, list[Any]] = defaultdict(list)
        for row in rows:
            if row.authentication and "presented" not in row.authentication:
                by_mailbox[row.mailbox_id].append(row)
        for mailbox_id in sorted(by_mailbox):
            messages = sorted(by_mailbox[mailbox_id], key=lambda row: row.uid)
            for row, uid in zip(messages, mailbox_uids_take(mailbox_id, len(messages)), strict=True):
                verdict = {**row.authentication, "presented": worked[row.pk]}
                message_model.objects.filter(pk=row.pk).update(uid=uid, authentication=verdict)
                written += 1
            folder_wake_publish(tenant_id=messages[0].tenant_id, mailbox_id=mailbox_id)
    return written
