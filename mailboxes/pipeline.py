"""Writes of the mail path's back half: parse, quarantine, index (DESIGN section 3 steps 3-4).

Each service takes a message id, claims the row in the state it expects with a row lock
(so two workers never do the same job twice) and moves it one state forward:
``stored -> parsed -> indexed``, or ``stored -> quarantined`` for what truly cannot be
parsed. The heavy work (reading the raw object, parsing, storing attachments) runs before
the claim, and everything it writes is content-addressed, so a lost race or a crash costs
only repeated work. Events: ``message.quarantined``, ``indexer.indexed``.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from uuid import UUID

from django.contrib.postgres.search import SearchVector
from django.db import connection, transaction
from django.db.models import TextField, Value
from django.db.models.expressions import CombinedExpression
from django.utils import timezone
from prometheus_client import Counter, Histogram

from audit.services import event_record
from mailboxes import antivirus, blobs
from mailboxes.authentication import Envelope, message_authentication_fields, verdict_summary
from mailboxes.models import Attachment, Message
from mailboxes.parse import ParsedMessage, Unparseable, message_bytes_parse
from mailboxes.threads import thread_id_compute
from mailboxes.waiting import wake_publish

logger = logging.getLogger(__name__)

PARSED = Counter("mailboxes_parsed_total", "Messages through the parse step, by outcome", ["outcome"])
INDEXED = Counter("mailboxes_indexed_total", "Messages indexed")
PARSE_SECONDS = Histogram(
    "mailboxes_parse_seconds", "Time to parse one message", buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)
)
SEARCH_CONFIG = "simple"  # no stemming or stop words: mail is multilingual, codes and names matter
MAX_INDEXED_BODY = 200_000  # characters of body in the tsvector (its limit is 1 MB)


class RawMissing(Exception):
    """The raw object is not in blob storage (a permanent condition, unlike an outage)."""


def raw_read(message: Message) -> bytes:
    """The raw bytes; :class:`RawMissing` when the object is gone, other errors are transient."""
    try:
        return blobs.blob_get(message.storage_key)
    except Exception:
        if not blobs.blob_exists(message.storage_key):
            raise RawMissing(message.storage_key) from None
        raise


def message_quarantine(
    *,
    message_id: UUID | str,
    reason: str,
    extra: dict[str, str] | None = None,
    fields: dict[str, object] | None = None,
    from_states: tuple[str, ...] = (Message.State.STORED,),
) -> bool:
    """Move a message to ``quarantined`` with its reason; the raw bytes stay.

    A stored message by default; an antivirus rescan also takes parsed and indexed ones
    (``from_states``). ``extra`` joins the event's data (the virus's signature), ``fields``
    are saved with the state (the scan verdict).
    """
    with transaction.atomic():
        message = Message.objects.select_for_update().filter(pk=message_id, state__in=from_states).first()
        if message is None:
            return False
        message.state = Message.State.QUARANTINED
        message.state_reason = reason[:500]
        message.state_changed_at = timezone.now()
        for name, value in (fields or {}).items():
            setattr(message, name, value)
        message.save(update_fields=["state", "state_reason", "state_changed_at", *(fields or {})])
        event_record(
            tenant_id=message.tenant_id,
            type="message.quarantined",
            data={
                "reason": message.state_reason,
                "key": message.storage_key,
                "sha256": message.sha256,
                **(extra or {}),
            },
            trace_id=message.trace_id,
            mailbox_id=message.mailbox_id,
            message_id=message.pk,
        )
    PARSED.labels("quarantined").inc()
    logger.warning("quarantined %s: %s", message_id, reason, extra={"trace_id": message.trace_id})
    return True


def _attachments_store(message: Message, parsed: ParsedMessage) -> list[Attachment]:
    rows = []
    for position, part in enumerate(parsed.attachments):
        digest = part.sha256
        key = blobs.attachment_key(message.tenant_id, digest)
        blobs.blob_put(key, part.content)
        rows.append(
            Attachment(
                tenant_id=message.tenant_id,
                message_id=message.pk,
                position=position,
                filename=part.filename,
                content_type=part.content_type,
                size=len(part.content),
                sha256=digest,
                content_id=part.content_id,
                is_inline=part.is_inline,
                storage_key=key,
            )
        )
    return rows


def _recipients_text(parsed: ParsedMessage, rcpt: str) -> str:
    entries = [f"{entry['name']} <{entry['address']}>" for entry in (*parsed.to, *parsed.cc)]
    return " ".join([*entries, rcpt.lower()])[:20_000]


def message_parse(*, message_id: UUID | str, index: bool = False) -> str:
    """Parse one stored message; returns the outcome ("parsed", "indexed", "quarantined", "skipped").

    With ``index``, the message is indexed in the same transaction and the same UPDATE (its
    search document built from the parsed values), so each message costs one row version and
    one commit instead of two: the row's many indexes make every version expensive.
    Transient failures (blob storage or database down) raise, for the task to retry.
    """
    message = (
        Message.objects.filter(pk=message_id, state=Message.State.STORED)
        .only(
            "pk",
            "tenant_id",
            "mailbox_id",
            "state",
            "storage_key",
            "sha256",
            "trace_id",
            "rcpt",
            "tags",
            "source",
            "remote_ip",
            "helo",
            "mail_from",
            "antivirus_verdict",
            "antivirus_signature",
        )
        .order_by()
        .first()
    )
    if message is None:
        return "skipped"
    started = time.perf_counter()
    try:
        raw = raw_read(message)
    except RawMissing:
        message_quarantine(message_id=message.pk, reason="raw object missing from blob storage")
        return "quarantined"
    # Antivirus after the 250 (quarantine and tag modes; raises while clamd is down and the
    # mode holds the message: the task retries). A virus is quarantined before it is parsed.
    screen = antivirus.message_screen(message=message, raw=raw)
    if screen.quarantine:
        extra = {"signature": screen.signature} if screen.signature else None
        message_quarantine(message_id=message.pk, reason=screen.quarantine, extra=extra, fields=screen.fields)
        return "quarantined"
    try:
        parsed = message_bytes_parse(raw)
    except Unparseable as exc:
        message_quarantine(message_id=message.pk, reason=str(exc))
        return "quarantined"
    attachments = _attachments_store(message, parsed)
    # SPF, DKIM, DMARC and ARC verified by us (DNS, so outside the row lock); our own
    # Authentication-Results, and the header list without forged ones claiming our authserv-id.
    trust = message_authentication_fields(
        raw=raw,
        sha256=message.sha256,
        envelope=Envelope(message.source, message.remote_ip, message.helo, message.mail_from),
        headers=parsed.headers,
    )
    with transaction.atomic():
        claimed = (
            Message.objects.select_for_update()
            .filter(pk=message.pk, state=Message.State.STORED, mailbox__isnull=False)
            .only("pk", "tenant_id", "mailbox_id", "trace_id", "rcpt", "tags")
            .order_by()
            .first()
        )
        if claimed is None or claimed.mailbox_id is None:  # parsed meanwhile, gone, or mailbox deleted
            return "skipped"
        now = timezone.now()
        fields = {
            "subject": parsed.subject,
            "from_address": parsed.from_address,
            "from_name": parsed.from_name,
            "to": parsed.to,
            "cc": parsed.cc,
            "reply_to": parsed.reply_to,
            "sender": parsed.sender,
            "recipients_text": _recipients_text(parsed, claimed.rcpt),
            "date": parsed.date,
            "message_id": parsed.message_id,
            "in_reply_to": parsed.in_reply_to,
            "references": parsed.references,
            "headers": parsed.headers,
            "text": parsed.text,
            "html": parsed.html,
            "stripped_text": parsed.stripped_text,
            "codes": parsed.codes,
            "links": parsed.links,
            "authentication_results": parsed.authentication_results,
            "received_spf": parsed.received_spf,
            "has_attachments": any(not row.is_inline for row in attachments),
            "attachment_names": " ".join(row.filename for row in attachments)[:10_000],
            "defects": parsed.defects,
            "tags": sorted({*claimed.tags, *parsed.x_tags, *screen.tags}),
            **screen.fields,
            "thread_id": thread_id_compute(
                mailbox_id=claimed.mailbox_id,
                message_pk=claimed.pk,
                message_id=parsed.message_id,
                in_reply_to=parsed.in_reply_to,
                references=parsed.references,
                subject=parsed.subject,
            ),
            "state": Message.State.INDEXED if index else Message.State.PARSED,
            "state_reason": "",
            "state_changed_at": now,
            "parsed_at": now,
            **trust,
        }
        updates: dict[str, object] = dict(fields)
        if index:
            updates["indexed_at"] = now
            if connection.vendor == "postgresql":
                updates["search_vector"] = search_vector_of(fields)
        Message.objects.filter(pk=claimed.pk).update(**updates)
        # A stored message has no attachment rows: they are written only in this transaction,
        # together with the state change that takes the message out of "stored".
        Attachment.objects.bulk_create(attachments)
        if index:
            _indexed_record(
                tenant_id=claimed.tenant_id,
                mailbox_id=claimed.mailbox_id,
                message_id=claimed.pk,
                trace_id=claimed.trace_id,
                thread_id=str(fields["thread_id"]),
                codes=len(parsed.codes),
                attachments=bool(fields["has_attachments"]),
                authentication=verdict_summary(trust.get("authentication")),
                antivirus=antivirus.verdict_summary(
                    str(fields.get("antivirus_verdict", message.antivirus_verdict)),
                    str(fields.get("antivirus_signature", message.antivirus_signature)),
                ),
            )
    PARSED.labels("parsed").inc()
    PARSE_SECONDS.observe(time.perf_counter() - started)
    if index:
        INDEXED.inc()
        return "indexed"
    return "parsed"


def _indexed_record(
    *,
    tenant_id: UUID,
    mailbox_id: UUID,
    message_id: UUID,
    trace_id: str,
    thread_id: str,
    codes: int,
    attachments: bool,
    authentication: dict[str, str | None],
    antivirus: dict[str, str],
) -> None:
    """The ``indexer.indexed`` event inside the indexing transaction; waiters are woken after it commits.

    ``authentication`` is the verdict summary (one result a mechanism, None when not verified);
    ``antivirus`` the scan's verdict and signature (:func:`mailboxes.antivirus.verdict_summary`).
    """
    event_record(
        tenant_id=tenant_id,
        type="indexer.indexed",
        data={
            "thread": thread_id,
            "codes": codes,
            "attachments": attachments,
            "authentication": authentication,
            "antivirus": antivirus,
        },
        trace_id=trace_id,
        mailbox_id=mailbox_id,
        message_id=message_id,
    )
    # Sent after the commit, so a waiter never sees a message that is not there yet.
    wake_publish(tenant_id=tenant_id, mailbox_id=mailbox_id, message_id=message_id)


def search_vector_of(fields: dict[str, Any]) -> CombinedExpression:
    """The weighted document of :func:`search_vector_expression`, from values about to be written.

    Within one UPDATE, column references read the row as it was, so a document written in
    the same statement as the parsed fields must be built from the values themselves.
    """

    def text(*names: str, limit: int | None = None) -> Value:
        joined = " ".join(str(fields.get(name) or "") for name in names)
        return Value(joined[:limit] if limit else joined, output_field=TextField())

    return (
        SearchVector(text("subject"), weight="A", config=SEARCH_CONFIG)
        + SearchVector(text("from_name", "from_address", "recipients_text"), weight="B", config=SEARCH_CONFIG)
        + SearchVector(
            Value(
                f"{str(fields.get('text') or '')[:MAX_INDEXED_BODY]} {fields.get('attachment_names') or ''}",
                output_field=TextField(),
            ),
            weight="C",
            config=SEARCH_CONFIG,
        )
    )


def search_vector_expression() -> CombinedExpression:
    """The weighted document: A subject, B addresses, C body and attachment names."""
    from django.db.models.functions import Left

    return (
        SearchVector("subject", weight="A", config=SEARCH_CONFIG)
        + SearchVector("from_name", "from_address", "recipients_text", weight="B", config=SEARCH_CONFIG)
        + SearchVector(Left("text", MAX_INDEXED_BODY), "attachment_names", weight="C", config=SEARCH_CONFIG)
    )


def message_index(*, message_id: UUID | str) -> bool:
    """Index one parsed message (idempotent); wakes waiters when the transaction commits."""
    with transaction.atomic():
        message = (
            Message.objects.select_for_update()
            .filter(pk=message_id, state=Message.State.PARSED)
            .only(
                "pk",
                "tenant_id",
                "mailbox_id",
                "thread_id",
                "codes",
                "has_attachments",
                "trace_id",
                "authentication",
                "antivirus_verdict",
                "antivirus_signature",
            )
            .first()
        )
        if message is None or message.mailbox_id is None:
            return False
        now = timezone.now()
        updates: dict[str, object] = {"state": Message.State.INDEXED, "state_changed_at": now, "indexed_at": now}
        if connection.vendor == "postgresql":
            updates["search_vector"] = search_vector_expression()
        Message.objects.filter(pk=message.pk).update(**updates)
        _indexed_record(
            tenant_id=message.tenant_id,
            mailbox_id=message.mailbox_id,
            message_id=message.pk,
            trace_id=message.trace_id,
            thread_id=message.thread_id,
            codes=len(message.codes),
            attachments=message.has_attachments,
            authentication=verdict_summary(message.authentication),
            antivirus=antivirus.verdict_summary(message.antivirus_verdict, message.antivirus_signature),
        )
    INDEXED.inc()
    return True


def message_reindex(*, message_id: UUID | str) -> None:
    """Recompute the search document of an indexed message (after tags change, say)."""
    if connection.vendor == "postgresql":
        Message.objects.filter(pk=message_id, state=Message.State.INDEXED).update(
            search_vector=search_vector_expression()
        )


_ = Value  # re-exported for callers composing documents
