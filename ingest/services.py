"""Writes of the mail path's front half: ``accept`` into the spool, and draining it.

``accept`` is the one entry point for a message from outside: SMTP/LMTP (through the async
group-commit writer in :mod:`ingest.smtp`, same envelope and spool), the API's raw upload,
and later IMAP pull. ``spool_entry_drain`` moves one durable spool entry into blob storage
and the database (DESIGN section 3 step 2); it is idempotent, so a crash at any point is
repaired by draining again.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from datetime import UTC, datetime
from functools import partial
from uuid import UUID

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages
from django.db import IntegrityError, transaction

from audit.services import audit_entry_record, event_record
from ingest import metrics
from ingest.spool import Envelope, Recipient, Spool, SpoolCorrupt, queue_id_new
from mailboxes.models import Mailbox, Message
from tenants.access import Permission, Principal
from tenants.services import require

logger = logging.getLogger(__name__)


def spool_default() -> Spool:
    return Spool(settings.SPOOL_DIR)


def accept(
    *,
    content: bytes,
    mail_from: str,
    recipients: list[Recipient],
    remote_ip: str | None = None,
    helo: str = "",
    tls: bool = False,
    source: str = Message.Source.API,
    spool: Spool | None = None,
) -> str:
    """Take responsibility for a message: durable in the spool when this returns.

    Returns the queue id (the trace id of the Message rows and events that follow). Raises
    OSError when the spool cannot take it; nothing is left half-written.
    """
    envelope = Envelope(
        queue_id=queue_id_new(),
        mail_from="" if mail_from == "<>" else mail_from,
        recipients=recipients,
        remote_ip=remote_ip,
        helo=helo[:255],
        tls=tls,
        received_at=time.time(),
        source=source,
    )
    (spool or spool_default()).store(envelope, content)
    metrics.MESSAGES.labels(source).inc()
    metrics.BYTES.labels(source).inc(len(content))
    logger.info("queued %s via %s: %d bytes", envelope.queue_id, source, len(content))
    return envelope.queue_id


def raw_storage_key(tenant_id: str, received_at: float, sha256: str) -> str:
    """``raw/<tenant>/<yyyy>/<mm>/<dd>/<sha256>.eml`` (DESIGN section 4): content-addressed."""
    day = datetime.fromtimestamp(received_at, tz=UTC)
    return f"raw/{tenant_id}/{day:%Y/%m/%d}/{sha256}.eml"


def blob_put(storage: Storage, key: str, content: bytes) -> None:
    """Store ``content`` under exactly ``key``; a second PUT of the same bytes is harmless."""
    if getattr(storage, "file_overwrite", False):
        name = storage.save(key, ContentFile(content))
    elif storage.exists(key):
        return
    else:
        name = storage.save(key, ContentFile(content))
    if name != key:
        raise RuntimeError(f"blob storage renamed {key} to {name}")


def spool_entry_drain(spool: Spool, queue_id: str, *, storage: Storage | None = None) -> str:
    """Drain one spool entry; returns the outcome ("stored", "duplicate", "held", "gone").

    Order: PUT the raw bytes (one object per tenant), then one transaction creating the
    Message rows and their events, parse enqueued on commit, then the spool file removed. A
    crash before the commit leaves the file to be drained again (the PUT repeats harmlessly);
    a crash after it leaves a file whose rows exist, so the re-drain creates nothing.
    """
    try:
        envelope, content = spool.read(queue_id)
    except FileNotFoundError:
        return "gone"
    except SpoolCorrupt as exc:
        logger.error("spool entry %s unreadable, moved to hold: %s", queue_id, exc)
        spool.move_to_hold(queue_id)
        metrics.DRAINED.labels("held").inc()
        return "held"
    storage = storage or storages["blobs"]
    by_tenant: dict[str, list[Recipient]] = defaultdict(list)
    for recipient in envelope.recipients:
        by_tenant[recipient.tenant_id].append(recipient)
    keys = {tenant_id: raw_storage_key(tenant_id, envelope.received_at, envelope.sha256) for tenant_id in by_tenant}
    existing = set(Message.objects.filter(trace_id=envelope.queue_id).values_list("mailbox_id", flat=True))
    wanted = {UUID(recipient.mailbox_id) for recipient in envelope.recipients} - existing
    if wanted:
        for tenant_id, key in keys.items():
            if any(UUID(r.mailbox_id) in wanted for r in by_tenant[tenant_id]):
                blob_put(storage, key, content)
    try:
        created = _messages_create(envelope, keys, wanted)
    except IntegrityError:
        # Another drainer committed the same entry first: nothing left to create.
        created = []
    spool.remove(queue_id)
    lag = max(0.0, time.time() - envelope.received_at)
    metrics.DRAIN_LAG.observe(lag)
    outcome = "stored" if created else "duplicate"
    metrics.DRAINED.labels(outcome).inc()
    logger.info(
        "drained %s: %d messages created",
        queue_id,
        len(created),
        extra={"trace_id": envelope.queue_id, "queue_id": envelope.queue_id},
    )
    return outcome


def _messages_create(envelope: Envelope, keys: dict[str, str], wanted: set[UUID]) -> list[Message]:
    from mailboxes.tasks import message_parse

    received_at = datetime.fromtimestamp(envelope.received_at, tz=UTC)
    created: list[Message] = []
    with transaction.atomic():
        live = dict(
            Mailbox.objects.filter(pk__in=wanted).values_list("pk", "tenant_id")
        )  # a mailbox deleted since RCPT takes its mail with it
        seen: set[UUID] = set()
        for recipient in envelope.recipients:
            mailbox_id = UUID(recipient.mailbox_id)
            if mailbox_id not in live or mailbox_id in seen:
                continue
            seen.add(mailbox_id)
            tenant_id = live[mailbox_id]
            if str(tenant_id) != recipient.tenant_id:
                logger.warning("spool %s: mailbox %s changed tenant, skipped", envelope.queue_id, mailbox_id)
                continue
            message = Message(
                tenant_id=tenant_id,
                mailbox_id=mailbox_id,
                state=Message.State.STORED,
                source=envelope.source,
                mail_from=envelope.mail_from[:320],
                rcpt=recipient.address[:320],
                tags=recipient.tags,
                remote_ip=envelope.remote_ip or None,
                helo=envelope.helo,
                tls=envelope.tls,
                size=envelope.size,
                sha256=envelope.sha256,
                storage_key=keys[recipient.tenant_id],
                trace_id=envelope.queue_id,
                received_at=received_at,
            )
            message.save(force_insert=True)
            received = {"queue_id": envelope.queue_id, "size": envelope.size, "source": envelope.source}
            uploaded = {"key": message.storage_key, "size": envelope.size, "sha256": envelope.sha256}
            for event_type, data in (("ingest.received", received), ("objectstore.uploaded", uploaded)):
                event_record(
                    tenant_id=message.tenant_id,
                    type=event_type,
                    data=data,
                    trace_id=envelope.queue_id,
                    mailbox_id=message.mailbox_id,
                    message_id=message.pk,
                )
            created.append(message)
            message_id = str(message.pk)
            # robust: a broker outage must not undo a committed message; the sweeper
            # re-enqueues whatever stays "stored" (the database says what is pending).
            transaction.on_commit(partial(message_parse.delay, message_id), robust=True)
    return created


def spool_drain(spool: Spool, *, limit: int | None = None, storage: Storage | None = None) -> dict[str, int]:
    """Drain every entry in the spool once, oldest first; counts by outcome.

    An entry that fails (blob storage or database down) stays in the spool and is counted
    as "failed"; the caller retries later.
    """
    counts: dict[str, int] = defaultdict(int)
    for queue_id in spool.pending()[:limit]:
        try:
            counts[spool_entry_drain(spool, queue_id, storage=storage)] += 1
        except Exception as exc:
            counts["failed"] += 1
            metrics.DRAINED.labels("failed").inc()
            logger.warning("drain of %s failed, will retry: %s", queue_id, type(exc).__name__)
    metrics.SPOOL_DEPTH.set(spool.depth())
    return dict(counts)


def message_upload(
    *, principal: Principal, mailbox: Mailbox, content: bytes, mail_from: str = "", remote_ip: str | None, tls: bool
) -> str:
    """A raw RFC 5322 message handed in through the API: the same spool and pipeline as SMTP.

    Audited (``message.upload``), unlike mail that arrives from the outside world.
    """
    require(principal, Permission.MESSAGES_WRITE)
    queue_id = accept(
        content=content,
        mail_from=mail_from,
        recipients=[Recipient(address=mailbox.address, mailbox_id=str(mailbox.pk), tenant_id=str(mailbox.tenant_id))],
        remote_ip=remote_ip,
        helo="api",
        tls=tls,
        source=Message.Source.API,
    )
    audit_entry_record(
        tenant_id=mailbox.tenant_id,
        actor=principal.actor,
        action="message.upload",
        resource_type="mailbox",
        resource_id=mailbox.pk,
        after={"queue_id": queue_id, "size": len(content)},
    )
    return queue_id
