"""Writes of the mail path's back half: parse, quarantine, index (DESIGN section 3 steps 3-4).

Each service takes a message id, claims the row in the state it expects with a row lock
(so two workers never do the same job twice) and moves it one state forward:
``stored -> parsed -> indexed``, or ``stored -> quarantined`` for what truly cannot be
parsed. The heavy work (reading the raw object, parsing, storing attachments) runs before
the claim, and everything it writes is content-addressed, so a lost race or a crash costs
only repeated work. Events: ``message.quarantined``, ``indexer.indexed``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast
from uuid import UUID

from celery.exceptions import SoftTimeLimitExceeded
from django.contrib.postgres.search import SearchVector
from django.db import DataError, connection, transaction
from django.db.models import Field, Value
from django.db.models.expressions import CombinedExpression
from django.utils import timezone
from prometheus_client import Counter, Histogram

from audit.services import EventSpec, event_record, events_record
from mailboxes import antivirus, blobs
from mailboxes.authentication import Envelope, message_authentication_fields, verdict_summary
from mailboxes.models import Attachment, Message
from mailboxes.parse import ParsedMessage, Unparseable, message_bytes_parse
from mailboxes.threads import thread_id_compute
from mailboxes.waiting import folder_wake_publish, wakes_publish
from mailplatform.rows import json_value, rows_insert

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
        if message.mailbox_id is not None:
            # A stored message no longer holds back the later ones IMAP and POP3 show.
            folder_wake_publish(tenant_id=message.tenant_id, mailbox_id=message.mailbox_id)
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


_LOADED_FIELDS = (
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


@dataclass
class _Prepared:
    """One message's parse, done outside any transaction, waiting for its claim and write."""

    message: Message
    parsed: ParsedMessage
    attachments: list[Attachment]
    screen: antivirus.Screen
    trust: dict[str, Any]
    started: float


def _stored_load(message_ids: Sequence[UUID | str]) -> list[Message]:
    """The messages still ``stored`` among ``message_ids``, in the order given, one query."""
    rows = {
        str(row.pk): row
        for row in Message.objects.filter(pk__in=list(message_ids), state=Message.State.STORED)
        .only(*_LOADED_FIELDS)
        .order_by()
    }
    return [rows[key] for key in dict.fromkeys(str(value) for value in message_ids) if key in rows]


def _prepare(message: Message) -> _Prepared | str:
    """Read, scan, parse, store attachments, verify: everything before the claim.

    Returns the work to write, or "quarantined" (a virus, missing raw object or bytes that are
    not a message; already recorded). Transient failures (blob storage, clamd holding the
    message, the database) raise.
    """
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
    return _Prepared(message, parsed, attachments, screen, trust, started)


def _fields(prepared: _Prepared, claimed: Message, *, index: bool, now: datetime) -> dict[str, Any]:
    """The parsed columns of one claimed message (its state, and the parse's every value)."""
    parsed, attachments, screen = prepared.parsed, prepared.attachments, prepared.screen
    assert claimed.mailbox_id is not None
    return {
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
        **prepared.trust,
    }


def _write(batch: list[_Prepared], *, index: bool) -> dict[str, str]:
    """Claim and write prepared messages in ONE transaction; outcome by message id.

    The rows are locked in primary-key order (two batches that share messages never
    deadlock) and only while still ``stored`` with a mailbox: one taken by another worker or
    whose mailbox is gone meanwhile is "skipped". One UPDATE for the batch's rows
    (:func:`_messages_update`), then one INSERT for every attachment of the batch and one
    for its ``indexer.indexed`` events (in the batch's order, which is the log's), one
    commit, and one notification for the waiters after it.
    """
    outcomes: dict[str, str] = {str(item.message.pk): "skipped" for item in batch}
    specs: list[EventSpec] = []
    wakes: list[tuple[UUID, UUID, UUID]] = []
    with transaction.atomic():
        claimed_rows = {
            row.pk: row
            for row in Message.objects.select_for_update()
            .filter(pk__in=[item.message.pk for item in batch], state=Message.State.STORED, mailbox__isnull=False)
            .only("pk", "tenant_id", "mailbox_id", "trace_id", "rcpt", "tags", "imap_presentation")
            .order_by("pk")
        }
        attachments: list[Attachment] = []
        rows: list[tuple[UUID, dict[str, Any]]] = []
        now = timezone.now()
        for item in batch:
            claimed = claimed_rows.get(item.message.pk)
            if claimed is None or claimed.mailbox_id is None:  # parsed meanwhile, gone, or mailbox deleted
                continue
            fields = _fields(item, claimed, index=index, now=now)
            updates: dict[str, object] = dict(fields)
            if claimed.imap_presentation is not None:
                # Shown over IMAP and POP3 before this parse (mailboxes.presentation): that
                # copy stays what they serve, whatever the verdict now puts first.
                updates.pop("imap_presentation", None)
            if index:
                updates["indexed_at"] = now
            rows.append((claimed.pk, updates))
            # A stored message has no attachment rows: they are written only in this
            # transaction, together with the state change that takes the message out of "stored".
            attachments.extend(item.attachments)
            outcomes[str(claimed.pk)] = "indexed" if index else "parsed"
            if index:
                specs.append(
                    _indexed_spec(
                        tenant_id=claimed.tenant_id,
                        mailbox_id=claimed.mailbox_id,
                        message_id=claimed.pk,
                        trace_id=claimed.trace_id,
                        thread_id=str(fields["thread_id"]),
                        codes=len(item.parsed.codes),
                        attachments=bool(fields["has_attachments"]),
                        authentication=verdict_summary(item.trust.get("authentication")),
                        antivirus=antivirus.verdict_summary(
                            str(fields.get("antivirus_verdict", item.message.antivirus_verdict)),
                            str(fields.get("antivirus_signature", item.message.antivirus_signature)),
                        ),
                    )
                )
                wakes.append((claimed.tenant_id, claimed.mailbox_id, claimed.pk))
            else:
                # IMAP and POP3 show a message once parsed (its copy is settled), indexed or not.
                folder_wake_publish(tenant_id=claimed.tenant_id, mailbox_id=claimed.mailbox_id)
        _messages_update(rows, index=index)
        rows_insert(attachments)
        events_record(specs)
        # Sent after the commit, so a waiter never sees a message that is not there yet.
        wakes_publish(wakes)
    for item in batch:
        if outcomes[str(item.message.pk)] != "skipped":
            PARSED.labels("parsed").inc()
            PARSE_SECONDS.observe(time.perf_counter() - item.started)
            if index:
                INDEXED.inc()
    return outcomes


def message_parse(*, message_id: UUID | str, index: bool = False) -> str:
    """Parse one stored message; returns the outcome ("parsed", "indexed", "quarantined", "skipped").

    With ``index``, the message is indexed in the same transaction and the same UPDATE (its
    search document built from the parsed values), so each message costs one row version and
    one commit instead of two: the row's many indexes make every version expensive.
    Transient failures (blob storage or database down) raise, for the task to retry.
    """
    messages = _stored_load([message_id])
    if not messages:
        return "skipped"
    prepared = _prepare(messages[0])
    if isinstance(prepared, str):
        return prepared
    return _write([prepared], index=index)[str(messages[0].pk)]


@dataclass
class BatchOutcome:
    """What :func:`messages_parse` did: outcome by message id, and the ids to take one by one."""

    outcomes: dict[str, str] = field(default_factory=dict)
    retry: list[str] = field(default_factory=list)  # a transient failure: their own task retries them


def messages_parse(*, message_ids: Sequence[UUID | str], index: bool = True) -> BatchOutcome:
    """Parse and index several stored messages with one query to load them and one transaction
    to write them (what one drained spool batch costs: one broker message, one commit).

    Each message is prepared on its own (read, scan, parse, verify); one that fails there
    transiently (blob storage, clamd holding it) goes to ``retry``, the others go on. Should
    the batch's transaction fail (a search document PostgreSQL refuses, say), every prepared
    message is written in a transaction of its own instead, nothing parsed again: one refused
    document then keeps its parse without it (``parsed``, for the ``index`` queue), and a
    message that still fails goes to ``retry``. A time limit (SoftTimeLimitExceeded) is not
    caught: the caller takes each message on its own, where the slow one is quarantined.
    """
    result = BatchOutcome()
    loaded = _stored_load(message_ids)
    found = {str(message.pk) for message in loaded}
    result.outcomes.update({str(value): "skipped" for value in message_ids if str(value) not in found})
    batch: list[_Prepared] = []
    for message in loaded:
        try:
            prepared = _prepare(message)
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            logger.warning("parse of %s failed, will retry: %s", message.pk, type(exc).__name__)
            result.retry.append(str(message.pk))
            continue
        if isinstance(prepared, str):
            result.outcomes[str(message.pk)] = prepared
        else:
            batch.append(prepared)
    if not batch:
        return result
    try:
        result.outcomes.update(_write(batch, index=index))
        return result
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        if len(batch) == 1 and not isinstance(exc, DataError):
            raise
        logger.warning("batch write of %d failed (%s), writing one by one", len(batch), type(exc).__name__)
    for item in batch:
        key = str(item.message.pk)
        try:
            try:
                result.outcomes.update(_write([item], index=index))
            except DataError as exc:
                if not index:
                    raise
                # PostgreSQL refused the search document (a tsvector's size is limited): keep the
                # parse, and let the index queue (then the stuck sweeper) deal with the document.
                logger.warning("inline index of %s refused, parsing alone: %s", key, type(exc).__name__)
                result.outcomes.update(_write([item], index=False))
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            logger.warning("parse of %s failed, will retry: %s", key, type(exc).__name__)
            result.retry.append(key)
    return result


def _indexed_spec(
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
) -> EventSpec:
    """The ``indexer.indexed`` event, to be recorded inside the indexing transaction.

    ``authentication`` is the verdict summary (one result a mechanism, None when not verified);
    ``antivirus`` the scan's verdict and signature (:func:`mailboxes.antivirus.verdict_summary`).
    """
    return EventSpec(
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


def search_texts(fields: dict[str, Any]) -> tuple[str, str, str]:
    """The texts of :func:`search_vector_expression`'s weights A, B and C, from values about to
    be written (within one UPDATE, column references read the row as it was)."""

    def joined(*names: str) -> str:
        return " ".join(str(fields.get(name) or "") for name in names)

    return (
        joined("subject"),
        joined("from_name", "from_address", "recipients_text"),
        f"{str(fields.get('text') or '')[:MAX_INDEXED_BODY]} {fields.get('attachment_names') or ''}",
    )


# The document of search_vector_expression, from the VALUES row's three texts.
_SEARCH_DOCUMENT = " || ".join(
    f"setweight(to_tsvector('{SEARCH_CONFIG}'::regconfig, v.search_{weight.lower()}), '{weight}')" for weight in "ABC"
)


def _messages_update(rows: list[tuple[UUID, dict[str, Any]]], *, index: bool) -> None:
    """Write the parsed columns of claimed messages: on PostgreSQL one UPDATE for the rows
    that set the same columns (all of a batch, as a rule), its values one JSON document
    read by ``json_to_recordset`` (one parameter, one ``json.dumps``, instead of a
    placeholder a column a row), the search document built in the statement from three
    texts a row.

    The rows are already locked by the caller (``SELECT ... FOR UPDATE`` in primary-key order),
    so the statement only writes; Django's per-row UPDATE compiled the same expressions once a
    message, which cost more CPU than parsing it. A value PostgreSQL refuses (a NUL in a
    text) fails the statement with a DataError, as the per-row UPDATE did.
    """
    if connection.vendor != "postgresql":
        for pk, updates in rows:
            Message.objects.filter(pk=pk).update(**updates)
        return
    groups: dict[tuple[str, ...], list[tuple[UUID, dict[str, Any]]]] = {}
    for pk, updates in rows:
        groups.setdefault(tuple(updates), []).append((pk, updates))
    meta = Message._meta
    for names, members in groups.items():
        columns_of = [cast("Field[Any, Any]", meta.get_field(name)) for name in names]
        record = ['"id" uuid', *(f'"{column.column}" {column.db_type(connection)}' for column in columns_of)]
        assignments = [f'"{column.column}" = v."{column.column}"' for column in columns_of]
        documents = []
        for pk, updates in members:
            document = {"id": pk, **{column.column: updates[column.name] for column in columns_of}}
            if index:
                document["search_a"], document["search_b"], document["search_c"] = search_texts(updates)
            documents.append(document)
        if index:
            record += ['"search_a" text', '"search_b" text', '"search_c" text']
            assignments.append(f'"search_vector" = {_SEARCH_DOCUMENT}')
        sql = (
            f'UPDATE "{meta.db_table}" AS m SET {", ".join(assignments)}'  # noqa: S608 (names from the model)
            f" FROM json_to_recordset(%s::json) AS v({', '.join(record)})"
            ' WHERE m."id" = v."id"'
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, [json.dumps(documents, ensure_ascii=False, default=json_value)])


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
        spec = _indexed_spec(
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
        events_record([spec])
        wakes_publish([(message.tenant_id, message.mailbox_id, message.pk)])
    INDEXED.inc()
    return True


def message_reindex(*, message_id: UUID | str) -> None:
    """Recompute the search document of an indexed message (after tags change, say)."""
    if connection.vendor == "postgresql":
        Message.objects.filter(pk=message_id, state=Message.State.INDEXED).update(
            search_vector=search_vector_expression()
        )


_ = Value  # re-exported for callers composing documents
