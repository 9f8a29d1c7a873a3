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
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from django.conf import settings
from django.core.files.storage import Storage, storages
from django.db import IntegrityError, transaction

from audit.services import Actor, EventSpec, audit_entry_record, events_record
from ingest import metrics
from ingest.platform_mail import is_signin_mail
from ingest.spool import Envelope, Recipient, Spool, SpoolCorrupt, queue_id_new
from mailboxes import blobs
from mailboxes.models import Mailbox, Message
from mailboxes.uids import messages_uids_assign
from mailplatform.enqueue import tasks_enqueue_on_commit
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
    blobs.blob_put(key, content, storage)


def spool_entry_drain(spool: Spool, queue_id: str, *, storage: Storage | None = None) -> str:
    """Drain one spool entry; returns the outcome ("stored", "duplicate", "held", "gone")."""
    return spool_entries_drain(spool, [queue_id], storage=storage)[0]


# How long a drain of one entry (APPEND, an API upload: the caller waits for its row) waits
# for another drainer that holds the same entry; a batch skips such entries ("busy").
CLAIM_WAIT = 30.0


def spool_entries_drain(spool: Spool, queue_ids: list[str], *, storage: Storage | None = None) -> list[str]:
    """Drain spool entries together; one outcome per id ("stored", "duplicate", "held", "gone",
    "dropped": our own sign-in mail, :func:`signin_mail_drop`; "busy": another drainer holds it).

    Each entry is claimed first (:meth:`ingest.spool.Spool.claim`), so drainers sharing the
    spool never drain one entry at once; one entry alone waits up to CLAIM_WAIT for the
    other drainer, and then usually finds it "gone" (drained, its rows committed).
    """
    held: dict[str, int] = {}
    outcomes: dict[str, str] = {}
    wait = CLAIM_WAIT if len(queue_ids) == 1 else 0.0
    try:
        for queue_id in dict.fromkeys(queue_ids):
            try:
                fd = spool.claim(queue_id, wait=wait)
            except FileNotFoundError:
                outcomes[queue_id] = "gone"
                continue
            if fd is None:
                outcomes[queue_id] = "busy"
            else:
                held[queue_id] = fd
        claimed = list(held)
        if claimed:
            outcomes.update(zip(claimed, _claimed_entries_drain(spool, claimed, storage=storage), strict=True))
    finally:
        for fd in held.values():
            spool.release(fd)
    return [outcomes[queue_id] for queue_id in queue_ids]


def _claimed_entries_drain(spool: Spool, queue_ids: list[str], *, storage: Storage | None = None) -> list[str]:
    """Drain spool entries we hold the claims of, together; one outcome per id.

    Order: PUT each raw message (one object per tenant), then ONE transaction creating the
    Message rows and events of every entry (group commit: under load the drainer takes the
    spool in batches, so rows, events and webhook deliveries go in with one INSERT each),
    parse enqueued on commit, then the spool files removed. A crash before the commit leaves
    the files to be drained again (the PUTs repeat harmlessly); a crash after it leaves files
    whose rows exist, so the re-drain creates nothing. If another drainer committed one of
    the entries first, the batch falls back to one transaction per entry.
    """
    storage = storage or storages["blobs"]
    outcomes: dict[str, str] = {}
    entries: list[tuple[Envelope, bytes]] = []
    for queue_id in queue_ids:
        try:
            entries.append(spool.read(queue_id))
        except FileNotFoundError:
            outcomes[queue_id] = "gone"
        except SpoolCorrupt as exc:
            logger.error("spool entry %s unreadable, moved to hold: %s", queue_id, exc)
            spool.move_to_hold(queue_id)
            metrics.DRAINED.labels("held").inc()
            outcomes[queue_id] = "held"
    for envelope, content in [entry for entry in entries if is_signin_mail(entry[1])]:
        entries.remove((envelope, content))
        outcomes[envelope.queue_id] = signin_mail_drop(spool, envelope)
    existing: dict[str, set[UUID]] = defaultdict(set)
    if entries:
        for trace_id, mailbox_id in Message.objects.filter(
            trace_id__in=[envelope.queue_id for envelope, _ in entries]
        ).values_list("trace_id", "mailbox_id"):
            existing[trace_id].add(mailbox_id)
    plans: list[_DrainPlan] = []
    for envelope, content in entries:
        by_tenant: dict[str, list[Recipient]] = defaultdict(list)
        for recipient in envelope.recipients:
            by_tenant[recipient.tenant_id].append(recipient)
        keys = {tenant: raw_storage_key(tenant, envelope.received_at, envelope.sha256) for tenant in by_tenant}
        wanted = {UUID(recipient.mailbox_id) for recipient in envelope.recipients} - existing[envelope.queue_id]
        for tenant_id, key in keys.items():
            if any(UUID(r.mailbox_id) in wanted for r in by_tenant[tenant_id]):
                blob_put(storage, key, content)
        plans.append(_DrainPlan(envelope, keys, wanted))
    try:
        created = _messages_create(plans)
    except IntegrityError:
        if len(plans) > 1:  # someone else drained one of them: settle each on its own
            return [
                outcomes.get(each) or _claimed_entries_drain(spool, [each], storage=storage)[0] for each in queue_ids
            ]
        created = {}  # another drainer committed this entry first: nothing left to create
    now = time.time()
    for plan in plans:
        queue_id = plan.envelope.queue_id
        spool.remove(queue_id)
        metrics.DRAIN_LAG.observe(max(0.0, now - plan.envelope.received_at))
        outcomes[queue_id] = "stored" if created.get(queue_id) else "duplicate"
        metrics.DRAINED.labels(outcomes[queue_id]).inc()
        logger.info(
            "drained %s: %d messages created",
            queue_id,
            created.get(queue_id, 0),
            extra={"trace_id": queue_id, "queue_id": queue_id},
        )
    return [outcomes[queue_id] for queue_id in queue_ids]


DROPPED_LOGIN_MAIL = "message.dropped_login_mail"


def signin_mail_drop(spool: Spool, envelope: Envelope) -> str:
    """Drop our own sign-in or invitation mail that came back in; returns "dropped".

    It never becomes a Message (nobody with access to the mailbox may read a link that signs
    in someone else). Each recipient mailbox's tenant gets an audit entry and the event
    ``message.dropped_login_mail`` (the queue id, never the link); a re-drain after a crash
    records nothing twice.
    """
    from audit.models import Event

    queue_id = envelope.queue_id
    with transaction.atomic():
        if not Event.objects.filter(trace_id=queue_id, type=DROPPED_LOGIN_MAIL).exists():
            live = dict(
                Mailbox.objects.filter(pk__in={UUID(r.mailbox_id) for r in envelope.recipients}).values_list(
                    "pk", "tenant_id"
                )
            )
            data = {"queue_id": queue_id, "size": envelope.size, "source": envelope.source}
            for mailbox_id, tenant_id in live.items():
                audit_entry_record(
                    tenant_id=tenant_id, actor=Actor.system("ingest"), action=DROPPED_LOGIN_MAIL,
                    resource_type="mailbox", resource_id=mailbox_id, after=data,
                )  # fmt: skip
            events_record(
                [
                    EventSpec(tenant_id=tenant_id, type=DROPPED_LOGIN_MAIL, data=data, trace_id=queue_id, mailbox_id=pk)
                    for pk, tenant_id in live.items()
                ]
            )
    spool.remove(queue_id)
    metrics.DRAINED.labels("dropped").inc()
    logger.warning(
        "dropped %s: our own sign-in mail came back in", queue_id, extra={"trace_id": queue_id, "queue_id": queue_id}
    )
    return "dropped"


@dataclass(frozen=True)
class _DrainPlan:
    envelope: Envelope
    keys: dict[str, str]  # tenant id -> raw object key
    wanted: set[UUID]  # mailboxes still without their Message


def _recipients_per_mailbox(recipients: list[Recipient]) -> list[Recipient]:
    """One recipient per mailbox (the first RCPT's address), carrying the tags of all its RCPTs.

    ``box@`` and ``box+news@`` in one transaction are one Message in ``box``, tagged ``news``.
    """
    merged: dict[str, Recipient] = {}
    for recipient in recipients:
        first = merged.setdefault(
            recipient.mailbox_id,
            Recipient(address=recipient.address, mailbox_id=recipient.mailbox_id, tenant_id=recipient.tenant_id),
        )
        first.tags.extend(tag for tag in recipient.tags if tag not in first.tags)
    return list(merged.values())


def _antivirus_fields(envelope: Envelope) -> dict[str, object]:
    """The scan made before the 250 (reject mode), so the pipeline does not scan again."""
    scan = envelope.antivirus
    if not scan or scan.get("verdict") not in {"clean", "infected", "error", "too_large"}:
        return {}
    return {
        "antivirus_verdict": scan["verdict"],
        "antivirus_signature": str(scan.get("signature") or "")[:255],
        "antivirus_scanned_at": datetime.fromtimestamp(float(scan.get("scanned_at") or envelope.received_at), tz=UTC),
    }


def _messages_create(plans: list[_DrainPlan]) -> dict[str, int]:
    """One transaction: the Message rows and events of every plan; messages created per queue id."""
    from mailboxes.tasks import messages_parse

    created: dict[str, int] = defaultdict(int)
    with transaction.atomic():
        # A mailbox deleted since RCPT takes its mail with it.
        live = dict(
            Mailbox.objects.filter(pk__in=set().union(*(plan.wanted for plan in plans))).values_list("pk", "tenant_id")
        )
        messages: list[Message] = []
        for plan in plans:
            envelope = plan.envelope
            received_at = datetime.fromtimestamp(envelope.received_at, tz=UTC)
            for recipient in _recipients_per_mailbox(envelope.recipients):
                mailbox_id = UUID(recipient.mailbox_id)
                if mailbox_id not in live or mailbox_id not in plan.wanted:
                    continue
                tenant_id = live[mailbox_id]
                if str(tenant_id) != recipient.tenant_id:
                    logger.warning("spool %s: mailbox %s changed tenant, skipped", envelope.queue_id, mailbox_id)
                    continue
                messages.append(
                    Message(
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
                        storage_key=plan.keys[recipient.tenant_id],
                        trace_id=envelope.queue_id,
                        received_at=received_at,
                        **_antivirus_fields(envelope),
                    )
                )
        if not messages:
            return created
        messages_uids_assign(messages)
        Message.objects.bulk_create(messages)
        specs = []
        for message in messages:
            received = {"queue_id": message.trace_id, "size": message.size, "source": message.source}
            uploaded = {"key": message.storage_key, "size": message.size, "sha256": message.sha256}
            for event_type, data in (("ingest.received", received), ("objectstore.uploaded", uploaded)):
                specs.append(
                    EventSpec(
                        tenant_id=message.tenant_id,
                        type=event_type,
                        data=data,
                        trace_id=message.trace_id,
                        mailbox_id=message.mailbox_id,
                        message_id=message.pk,
                    )
                )
            created[message.trace_id] += 1
        events_record(specs)
        # After the commit, and never raising: a broker outage must not make a committed
        # batch look failed (its files would be drained again); the sweeper re-enqueues
        # whatever stays "stored" (the database says what is pending).
        # One task for the batch: one broker message and one parse transaction for all of it.
        tasks_enqueue_on_commit(messages_parse, [([str(message.pk) for message in messages],)])
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
