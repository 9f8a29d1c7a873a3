"""Writes of outbound mail: DKIM keys, sending (API and submission), suppressions.

A message is accepted only once it is committed with its recipients (the same discipline as
the inbound spool: 202 or 250 after the commit), then delivered by the Celery worker
(outbound/delivery.py). The sender is checked here, for both doors alike.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import email.utils
import logging
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email import message_from_bytes
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import OuterRef, Q, Subquery
from django.utils import timezone

from audit.services import EventSpec, audit_entry_record, event_record, events_record
from mailplatform.enqueue import tasks_enqueue_on_commit
from outbound import dkim as dkim_keys
from outbound.models import DkimKey, DomainSending, OutboundMessage, Recipient, SendCounter, Suppression
from tenants import crypto
from tenants import dns as tenant_dns
from tenants.access import Permission, Principal
from tenants.models import Domain

logger = logging.getLogger(__name__)

ADDRESS_PATTERN = re.compile(r"^[^@\s<>\"(),;:\\]+@[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?$", re.IGNORECASE)
# Header fields a JSON send may not set: we write them, or they would lie about the message.
RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "dkim-signature",
        "return-path",
        "received",
        "sender",
    }
)


class SendRefused(Exception):
    """A send that cannot be accepted: ``code`` for programs, the message for people."""

    def __init__(self, code: str, message: str, *, status: int = 400, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.retry_after = retry_after  # seconds, for a refusal that passes (429: Retry-After)


def require(principal: Principal, permission: Permission) -> None:
    if not principal.has_perm(permission):
        raise PermissionDenied(f"This action needs the {permission} permission.")


def address_normalize(address: str) -> str:
    """``Box@Example.COM`` -> ``Box@example.com`` (the domain is case-insensitive, RFC 5321 2.4);
    ValidationError for something that is not one plain address."""
    candidate = address.strip()
    local, at, domain = candidate.rpartition("@")
    if not at or not local:
        raise ValidationError(f"{address[:100]!r} is not an e-mail address.", code="invalid_address")
    try:
        domain = domain.rstrip(".").lower().encode("idna").decode("ascii")
    except UnicodeError:
        raise ValidationError(f"{address[:100]!r} has an invalid domain.", code="invalid_address") from None
    normalized = f"{local}@{domain}"
    if len(normalized) > 254 or not ADDRESS_PATTERN.match(normalized) or any(ord(c) < 32 for c in normalized):
        raise ValidationError(f"{address[:100]!r} is not an e-mail address.", code="invalid_address")
    return normalized


# --- DKIM keys -------------------------------------------------------------------------------
def dkim_key_create(*, principal: Principal, domain: Domain, algorithm: str = "rsa", selector: str = "") -> DkimKey:
    """A new key for ``domain``, pending until its TXT record is published and verified.

    With an active key already there, this is the first half of a rotation: both selectors
    stay published, the new one signs once verified (:func:`dkim_key_verify`)."""
    require(principal, Permission.DOMAINS_MANAGE)
    if not principal.may_manage_domain(domain.pk):
        raise PermissionDenied("This key may not manage this domain.")
    selector = (selector or dkim_keys.selector_new()).strip().lower()
    if not dkim_keys.SELECTOR_PATTERN.match(selector):
        raise ValidationError({"selector": "Letters, digits and hyphens, 1 to 63 characters."})
    if algorithm not in DkimKey.Algorithm.values:
        raise ValidationError({"algorithm": f"One of {', '.join(DkimKey.Algorithm.values)}."})
    if DkimKey.objects.filter(domain=domain).exclude(state=DkimKey.State.RETIRED).count() >= 2:
        raise ValidationError(
            "This domain already has two keys in use (active and pending): verify or delete one first.",
            code="dkim_rotation_in_progress",
        )
    pair = dkim_keys.key_pair_generate(algorithm)
    try:
        with transaction.atomic():
            key = DkimKey.objects.create(
                tenant_id=domain.tenant_id,
                domain=domain,
                selector=selector,
                algorithm=algorithm,
                private_key_encrypted=crypto.encrypt(pair.private),
                public_key=pair.public,
            )
    except IntegrityError:
        raise ValidationError({"selector": "This domain already has a key with this selector."}) from None
    audit_entry_record(
        tenant_id=domain.tenant_id,
        actor=principal.actor,
        action="dkim_key.create",
        resource_type="dkim_key",
        resource_id=key.pk,
        after={"domain": domain.name, "selector": selector, "algorithm": algorithm},
    )
    return key


@dataclass(frozen=True)
class DkimCheck:
    published: bool
    error: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"published": self.published, "error": self.error}


def dkim_key_check(key: DkimKey) -> DkimCheck:
    """Whether the key's TXT record is published (the domain checks' own resolver)."""
    try:
        records = tenant_dns.domain_records(key.record_name).txt
    except tenant_dns.LookupFailed as exc:
        return DkimCheck(published=False, error=f"DNS did not answer: {exc}"[:300])
    if any(dkim_keys.record_matches(record, key.public_key) for record in records):
        return DkimCheck(published=True)
    if records:
        return DkimCheck(published=False, error="A TXT record is there, but its p= is not this key.")
    return DkimCheck(published=False, error=f"No TXT record at {key.record_name}.")


def dkim_key_verify(*, principal: Principal, key: DkimKey) -> DkimCheck:
    """Look the TXT record up now; once it is published a pending key becomes the active one
    and the previous active key is retired (it stays published, signs nothing more)."""
    require(principal, Permission.DOMAINS_MANAGE)
    check = dkim_key_check(key)
    now = timezone.now()
    with transaction.atomic():
        key = DkimKey.objects.select_for_update().select_related("domain").get(pk=key.pk)
        key.published, key.last_checked_at, key.last_check_error = check.published, now, check.error
        if check.published and key.state == DkimKey.State.PENDING:
            DkimKey.objects.filter(domain_id=key.domain_id, state=DkimKey.State.ACTIVE).update(
                state=DkimKey.State.RETIRED, retired_at=now
            )
            key.state, key.activated_at = DkimKey.State.ACTIVE, now
        key.save()
        audit_entry_record(
            tenant_id=key.tenant_id,
            actor=principal.actor,
            action="dkim_key.verify",
            resource_type="dkim_key",
            resource_id=key.pk,
            after={**check.as_json(), "state": key.state},
        )
    return check


def dkim_key_delete(*, principal: Principal, key: DkimKey) -> None:
    """Remove a key. The active key goes only once a newer one is active (no unsigned gap)."""
    require(principal, Permission.DOMAINS_MANAGE)
    if key.state == DkimKey.State.ACTIVE:
        raise ValidationError(
            "This is the key that signs: create and verify a new key first (rotation), then delete this one.",
            code="dkim_key_active",
        )
    audit_entry_record(
        tenant_id=key.tenant_id,
        actor=principal.actor,
        action="dkim_key.delete",
        resource_type="dkim_key",
        resource_id=key.pk,
        before={"selector": key.selector, "state": key.state},
    )
    key.delete()


def dkim_key_active(domain_id: Any) -> DkimKey | None:
    return DkimKey.objects.filter(domain_id=domain_id, state=DkimKey.State.ACTIVE).select_related("domain").first()


# --- Suppressions ----------------------------------------------------------------------------
def suppression_add(
    *, principal: Principal, address: str, reason: str = Suppression.Reason.MANUAL, detail: str = ""
) -> Suppression:
    require(principal, Permission.MESSAGES_SEND)
    normalized = address_normalize(address).lower()
    suppression, created = Suppression.objects.get_or_create(
        tenant_id=principal.tenant_id, address=normalized, defaults={"reason": reason, "detail": detail[:1000]}
    )
    if created:
        audit_entry_record(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action="suppression.create",
            resource_type="suppression",
            resource_id=suppression.pk,
            after={"address": normalized, "reason": reason},
        )
    return suppression


def suppression_remove(*, principal: Principal, suppression: Suppression) -> None:
    require(principal, Permission.MESSAGES_SEND)
    audit_entry_record(
        tenant_id=suppression.tenant_id,
        actor=principal.actor,
        action="suppression.delete",
        resource_type="suppression",
        resource_id=suppression.pk,
        before={"address": suppression.address, "reason": suppression.reason},
    )
    suppression.delete()


def suppression_record(*, tenant_id: Any, address: str, reason: str, detail: str) -> None:
    """A hard bounce or a complaint suppresses the address (the platform's own doing)."""
    Suppression.objects.get_or_create(
        tenant_id=tenant_id, address=address.lower(), defaults={"reason": reason, "detail": detail[:1000]}
    )


# --- Sending ---------------------------------------------------------------------------------
@dataclass
class Attachment:
    filename: str
    content: bytes
    content_type: str = "application/octet-stream"


@dataclass
class Composition:
    """A JSON send, before it is a message."""

    from_address: str
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    subject: str = ""
    text: str = ""
    html: str = ""
    reply_to: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    attachments: list[Attachment] = field(default_factory=list)
    reply_to_message: Any = None  # a mailboxes.Message the principal may see


def attachment_decode(filename: str, content_base64: str, content_type: str) -> Attachment:
    try:
        content = base64.b64decode(content_base64, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError({"attachments": f"{filename[:100]!r}: content is not base64."}) from None
    return Attachment(filename=filename, content=content, content_type=content_type or "application/octet-stream")


def _header_safe(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValidationError({"headers": "Header values cannot contain line breaks."})
    return value


def composition_render(composition: Composition, *, message_id: str) -> bytes:
    """The RFC 5322 message of a JSON send: headers, text and/or HTML, attachments; CRLF."""
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = _header_safe(composition.from_address)
    if composition.to:
        message["To"] = ", ".join(composition.to)
    if composition.cc:
        message["Cc"] = ", ".join(composition.cc)
    if composition.reply_to:
        message["Reply-To"] = ", ".join(composition.reply_to)
    message["Subject"] = _header_safe(composition.subject)
    message["Date"] = email.utils.formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = message_id
    parent = composition.reply_to_message
    if parent is not None and parent.message_id:
        # RFC 5322 section 3.6.4: the parent's References (or In-Reply-To), then its own id.
        references = list(parent.references or []) or ([parent.in_reply_to] if parent.in_reply_to else [])
        message["In-Reply-To"] = parent.message_id
        message["References"] = " ".join([*references[-20:], parent.message_id])
    message["MIME-Version"] = "1.0"
    for name, value in composition.headers.items():
        if name.strip().lower() in RESERVED_HEADERS or not re.fullmatch(r"[!-9;-~]{1,76}", name):
            raise ValidationError({"headers": f"The header {name[:80]!r} cannot be set."})
        message[name] = _header_safe(value)
    message.set_content(composition.text or ("" if composition.html else " "))
    if composition.html:
        message.add_alternative(composition.html, subtype="html")
    for attachment in composition.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        message.add_attachment(
            attachment.content,
            maintype=maintype or "application",
            subtype=subtype or "octet-stream",
            filename=attachment.filename,
        )
    return message.as_bytes()


def _addresses(values: Iterable[str], field_name: str) -> list[str]:
    result = []
    for value in values:
        try:
            result.append(address_normalize(value))
        except ValidationError as exc:
            raise ValidationError({field_name: exc.messages}, code="invalid_address") from None
    return result


@dataclass(frozen=True)
class Sender:
    domain_id: Any
    mailbox_id: Any  # the sender's mailbox, or None (a domain that allows any local part)


def sender_check(principal: Principal, from_address: str) -> Sender:
    """The sender must be a live mailbox of a verified domain this principal may use, or any
    address of such a domain whose sending policy allows any local part (DomainSending) when
    the principal holds the whole domain. One query: the domain in the principal's scope,
    its policy, and the mailbox in the principal's scope.

    Raises :class:`SendRefused` with ``domain_not_verified`` or ``sender_not_allowed``."""
    from mailboxes.models import Mailbox

    local, _, domain_name = from_address.rpartition("@")
    mailbox = (
        principal.scope(Mailbox.objects.live(), domain_field="domain", mailbox_field="pk")
        .filter(domain=OuterRef("pk"), local_part=local.lower())
        .order_by()
        .values("pk")[:1]
    )
    found = (
        principal.scope_domains(Domain.objects.all())
        .filter(name=domain_name.lower())
        .order_by()
        .annotate(sender_mailbox_id=Subquery(mailbox))
        .values_list("pk", "state", "outbound_sending__any_local_part", "sender_mailbox_id")[:1]
    )
    row = next(iter(found), None)
    if row is None or row[1] not in (Domain.State.VERIFIED, Domain.State.MX_LOST):
        raise SendRefused(
            "domain_not_verified",
            f"{domain_name} is not a verified domain of this tenant: verify it before sending from it.",
            status=403,
        )
    domain_id, _, any_local_part, mailbox_id = row
    if mailbox_id is None:
        if any_local_part and principal.may_use_domain(domain_id):
            return Sender(domain_id=domain_id, mailbox_id=None)
        raise SendRefused("sender_not_allowed", f"{from_address} is not a mailbox this key may send as.", status=403)
    return Sender(domain_id=domain_id, mailbox_id=mailbox_id)


# One statement bumps the minute's and the day's counters and reads the previous minute's:
# the rate is a sliding window estimated from two fixed ones (the previous minute weighted by
# how much of it the last 60 seconds still cover), so a burst across a minute's edge is held.
# SQLite has no INSERT inside WITH: there the two halves are two statements.
_COUNTERS_BUMPED = """
    INSERT INTO outbound_sendcounter (tenant_id, period, start, messages, recipients)
    VALUES (%(tenant)s, 'minute', %(minute)s, %(messages)s, %(recipients)s),
           (%(tenant)s, 'day', %(day)s, %(messages)s, %(recipients)s)
    ON CONFLICT (tenant_id, period, start) DO UPDATE
        SET messages = outbound_sendcounter.messages + EXCLUDED.messages,
            recipients = outbound_sendcounter.recipients + EXCLUDED.recipients
    RETURNING 'now', period, messages, recipients
"""
_COUNTERS_PREVIOUS = """
SELECT 'previous', period, messages, recipients FROM outbound_sendcounter
WHERE tenant_id = %(tenant)s AND period = 'minute' AND start = %(previous)s
"""
# Outside a transaction the bump commits on its own without waiting for the WAL flush
# (set_config(..., true) lasts for this statement's implicit transaction): the counter rows
# are locked for the statement alone, not until the send's commit, so one tenant's sends no
# longer queue behind each other's fsync. The send's own (flushed) commit comes after and
# flushes the bump's WAL with it: a crash cannot keep an accepted send and lose its count.
_COUNTERS_BUMP = (
    "WITH unflushed AS (SELECT set_config('synchronous_commit', 'off', true)), "  # noqa: S608 (constants)
    f"bumped AS ({_COUNTERS_BUMPED}) SELECT * FROM bumped UNION ALL {_COUNTERS_PREVIOUS} "
    "UNION ALL SELECT 'setting', '', 0, 0 FROM unflushed"
)


def _counters_parameters(tenant_id: Any, recipients: int, now: datetime, messages: int) -> dict[str, Any]:
    minute = now.replace(second=0, microsecond=0)
    start = SendCounter._meta.get_field("start")
    return {
        "tenant": SendCounter._meta.get_field("tenant").get_db_prep_value(tenant_id, connection),
        "minute": start.get_db_prep_value(minute, connection),
        "day": start.get_db_prep_value(minute.replace(hour=0, minute=0), connection),
        "previous": start.get_db_prep_value(minute - timedelta(minutes=1), connection),
        "messages": messages,
        "recipients": recipients,
    }


def _counters_bump(tenant_id: Any, recipients: int, now: datetime) -> list[tuple[Any, ...]]:
    parameters = _counters_parameters(tenant_id, recipients, now, 1)
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute(_COUNTERS_BUMPED, parameters)
            rows = cursor.fetchall()
            cursor.execute(_COUNTERS_PREVIOUS, parameters)
            return rows + cursor.fetchall()
        cursor.execute(_COUNTERS_BUMP if not connection.in_atomic_block else _COUNTERS_BUMP_LOCKED, parameters)
        return cursor.fetchall()


# Inside a transaction (an Idempotency-Key's, or SQLite's fallback) the bump is part of it.
_COUNTERS_BUMP_LOCKED = f"WITH bumped AS ({_COUNTERS_BUMPED}) SELECT * FROM bumped UNION ALL {_COUNTERS_PREVIOUS}"  # noqa: S608 (constants)


def _counters_release(tenant_id: Any, recipients: int, now: datetime) -> None:
    """Take back a bump whose send was refused or failed (a crash in between counts a send
    that did not happen: the safe side of a limit)."""
    with connection.cursor() as cursor:
        cursor.execute(_COUNTERS_RELEASE, _counters_parameters(tenant_id, recipients, now, 1))


_COUNTERS_RELEASE = """
UPDATE outbound_sendcounter SET messages = messages - %(messages)s, recipients = recipients - %(recipients)s
WHERE tenant_id = %(tenant)s AND ((period = 'minute' AND start = %(minute)s) OR (period = 'day' AND start = %(day)s))
"""


def _limits_check(tenant_id: Any, recipients: int, now: datetime) -> None:
    """Per-tenant rate (messages a minute) and daily quota (recipients since midnight UTC),
    counted in SendCounter rows so every web process and submission server agrees.

    Called before the send's transaction, the bump committed on its own (see
    _COUNTERS_BUMP); a refusal takes its bump back before it raises, and a send that fails
    afterwards calls :func:`_counters_release`. Two sends at the limit may both be refused
    for a moment (each sees the other's bump), never both accepted past it."""
    rows = _counters_bump(tenant_id, recipients, now)
    current = {period: (messages, sent) for which, period, messages, sent in rows if which == "now"}
    before = sum(messages for which, _, messages, _ in rows if which == "previous")
    minute = now.replace(second=0, microsecond=0)
    elapsed = (now - minute).total_seconds() / 60
    refusal: SendRefused | None = None
    if current["minute"][0] + before * (1 - elapsed) > settings.OUTBOUND_RATE_PER_TENANT:
        refusal = SendRefused(
            "rate_limited",
            f"More than {settings.OUTBOUND_RATE_PER_TENANT} messages in the last minute; slow down and retry.",
            status=429,
            retry_after=max(1, 60 - int(elapsed * 60)),  # the next minute's window
        )
    elif current["day"][1] > settings.OUTBOUND_DAILY_QUOTA:
        today = current["day"][1]
        refusal = SendRefused(
            "quota_exceeded",
            f"The daily quota of {settings.OUTBOUND_DAILY_QUOTA} recipients is used up "
            f"({today - recipients} sent today); it renews at midnight UTC.",
            status=429,
            retry_after=max(1, int((minute.replace(hour=0, minute=0) + timedelta(days=1) - now).total_seconds())),
        )
    if refusal is not None:
        _counters_release(tenant_id, recipients, now)
        raise refusal


def counters_prune(now: datetime | None = None) -> int:
    """Forget counter windows nobody reads again (beat: recipients_due_dispatch)."""
    now = now or timezone.now()
    old = Q(period=SendCounter.Period.MINUTE, start__lt=now - timedelta(minutes=10)) | Q(
        period=SendCounter.Period.DAY, start__lt=now - timedelta(days=2)
    )
    return SendCounter.objects.filter(old).delete()[0]


def bounce_address(recipient_id: uuid.UUID) -> str:
    """The VERP return path of one recipient (a DSN names exactly what bounced)."""
    return f"bounces+{recipient_id.hex}@{settings.OUTBOUND_BOUNCE_DOMAIN}"


@dataclass(frozen=True)
class Queued:
    message: OutboundMessage
    recipients: list[Recipient]


def message_queue(
    *,
    principal: Principal,
    content: bytes,
    from_address: str,
    recipients: Sequence[str],
    source: str = OutboundMessage.Source.API,
    sender: Sender | None = None,
) -> Queued:
    """Check the sender and the limits, then commit the message and its recipients and
    enqueue delivery after the commit. Suppressed recipients are recorded as ``suppressed``
    and not sent. ``sender`` is :func:`sender_check`'s answer when the caller has it already.
    Raises :class:`SendRefused` or PermissionDenied."""
    require(principal, Permission.MESSAGES_SEND)
    from_address = address_normalize(from_address)
    if sender is None:
        sender = sender_check(principal, from_address)
    unique = list(dict.fromkeys(address_normalize(address) for address in recipients))
    if not unique:
        raise SendRefused("no_recipients", "Name at least one recipient (to, cc or bcc).")
    if len(unique) > settings.OUTBOUND_MAX_RECIPIENTS:
        raise SendRefused("too_many_recipients", f"At most {settings.OUTBOUND_MAX_RECIPIENTS} recipients a message.")
    limit = principal.tenant.max_message_size or settings.INGEST_MAX_MESSAGE_SIZE
    if len(content) > limit:
        raise SendRefused("message_too_large", f"The message is larger than {limit} bytes.", status=413)
    parsed = BytesHeaderParser().parsebytes(content)  # Subject and Message-ID: the header only
    now = timezone.now()
    from outbound.bounces import bounce_mailbox_ensure
    from outbound.tasks import deliveries_enqueue, sent_copy_store

    bounce_mailbox_ensure()  # DSNs to our VERP addresses must find a mailbox
    message = OutboundMessage(
        tenant_id=principal.tenant_id,
        domain_id=sender.domain_id,
        mailbox_id=sender.mailbox_id,
        source=source,
        from_address=from_address,
        mail_from=f"bounces@{settings.OUTBOUND_BOUNCE_DOMAIN}",
        subject=str(parsed.get("Subject", ""))[:998],
        message_id=str(parsed.get("Message-ID", ""))[:998],
        content=content,
        size=len(content),
        actor_label=principal.actor.label[:300],
        created_at=now,
    )
    give_up = now + timedelta(seconds=settings.OUTBOUND_GIVE_UP_AFTER)
    rows = [
        Recipient(
            message=message,
            tenant_id=principal.tenant_id,
            address=address,
            state=Recipient.State.QUEUED,
            next_attempt_at=now,
            give_up_at=give_up,
        )
        for address in unique
    ]
    # The limits first, their bump committed on its own (_limits_check): the counter rows
    # are not held through the send's transaction. Taken back if the send fails.
    _limits_check(principal.tenant_id, len(unique), now)
    try:
        with transaction.atomic():
            _message_insert(message, rows)
            specs = [
                EventSpec(
                    tenant_id=principal.tenant_id,
                    type="outbound.queued",
                    data={"outbound_id": str(message.pk), "recipients": len(rows), "source": source},
                    trace_id=str(message.pk),
                    domain_id=sender.domain_id,
                    mailbox_id=sender.mailbox_id,
                )
            ]
            specs += [
                EventSpec(
                    tenant_id=principal.tenant_id,
                    type="outbound.suppressed",
                    data={"outbound_id": str(message.pk), "recipient": row.address},
                    trace_id=str(message.pk),
                    domain_id=sender.domain_id,
                )
                for row in rows
                if row.state == Recipient.State.SUPPRESSED
            ]
            events_record(specs)
            audit_entry_record(
                tenant_id=principal.tenant_id,
                actor=principal.actor,
                action="message.send",
                resource_type="outbound_message",
                resource_id=message.pk,
                after={"from": from_address, "recipients": len(rows), "size": len(content), "source": source},
            )
            # One task delivers a batch of sends and files their sent copies (outbound/tasks.py);
            # a message with nothing to deliver has its sent copy filed alone.
            if any(row.state == Recipient.State.QUEUED for row in rows):
                deliveries_enqueue.add_on_commit([(str(message.pk), sender.mailbox_id is not None)])
            elif sender.mailbox_id is not None:
                tasks_enqueue_on_commit(sent_copy_store, [(str(message.pk),)])
    except BaseException:
        try:
            _counters_release(principal.tenant_id, len(unique), now)
        except Exception:  # the send's own error is the one to report
            logger.exception("outbound: the counters of a failed send could not be taken back")
        raise
    return Queued(message=message, recipients=rows)


_SUPPRESSED_RESPONSE = "suppressed: this address bounced or complained before"

# The message and its recipients in one statement, each recipient's suppression looked up
# by the same statement (PostgreSQL; the ORM's three statements elsewhere).
_MESSAGE_INSERT = """
WITH message AS (
    INSERT INTO outbound_outboundmessage (id, tenant_id, domain_id, mailbox_id, source, from_address, mail_from,
        subject, message_id, content, size, actor_label, sent_message_id, created_at)
    VALUES (%(id)s, %(tenant)s, %(domain)s, %(mailbox)s, %(source)s, %(from_address)s, %(mail_from)s,
        %(subject)s, %(message_id)s, %(content)s, %(size)s, %(actor_label)s, NULL, %(created_at)s)
    RETURNING id
)
INSERT INTO outbound_recipient (id, message_id, tenant_id, address, state, attempts, next_attempt_at,
    claimed_until, give_up_at, last_attempt_at, last_response, remote_host, delivered_at, bounced_at, dkim_selector)
SELECT wanted.id, message.id, %(tenant)s, wanted.address,
    CASE WHEN suppression.id IS NULL THEN 'queued' ELSE 'suppressed' END, 0, %(created_at)s,
    NULL, %(give_up)s, NULL, CASE WHEN suppression.id IS NULL THEN '' ELSE %(suppressed)s END, '', NULL, NULL, ''
FROM message, unnest(%(ids)s::uuid[], %(addresses)s::varchar[], %(lowered)s::varchar[]) AS wanted (id, address, lowered)
LEFT JOIN outbound_suppression AS suppression
    ON suppression.tenant_id = %(tenant)s AND suppression.address = wanted.lowered
RETURNING id, state
"""


def _message_insert(message: OutboundMessage, rows: list[Recipient]) -> None:
    """INSERT ``message`` and its recipients (all ``queued``); a recipient whose address the
    tenant suppresses becomes ``suppressed`` (not sent), in ``rows`` too."""
    if connection.vendor != "postgresql":
        suppressed = set(
            Suppression.objects.filter(
                tenant_id=message.tenant_id, address__in=[row.address.lower() for row in rows]
            ).values_list("address", flat=True)
        )
        for row in rows:
            if row.address.lower() in suppressed:
                row.state, row.last_response = Recipient.State.SUPPRESSED, _SUPPRESSED_RESPONSE
        message.save(force_insert=True)
        Recipient.objects.bulk_create(rows)
        return
    parameters: dict[str, Any] = {
        "id": message.pk,
        "tenant": message.tenant_id,
        "domain": message.domain_id,
        "mailbox": message.mailbox_id,
        "source": str(message.source),
        "from_address": message.from_address,
        "mail_from": message.mail_from,
        "subject": message.subject,
        "message_id": message.message_id,
        "content": message.content,
        "size": message.size,
        "actor_label": message.actor_label,
        "created_at": message.created_at,
        "give_up": rows[0].give_up_at,
        "suppressed": _SUPPRESSED_RESPONSE,
        "ids": [row.pk for row in rows],
        "addresses": [row.address for row in rows],
        "lowered": [row.address.lower() for row in rows],
    }
    with connection.cursor() as cursor:
        cursor.execute(_MESSAGE_INSERT, parameters)
        states = dict(cursor.fetchall())
    for instance in (message, *rows):
        instance._state.adding, instance._state.db = False, connection.alias
    for row in rows:
        if states.get(row.pk) == Recipient.State.SUPPRESSED:
            row.state, row.last_response = Recipient.State.SUPPRESSED, _SUPPRESSED_RESPONSE


def message_id_new(domain: str) -> str:
    return f"<{uuid.uuid4().hex}@{domain}>"


def message_send(*, principal: Principal, composition: Composition) -> Queued:
    """A JSON send: compose the message (threaded under ``reply_to_message``), then queue it."""
    from_address = address_normalize(composition.from_address)
    composition.to = _addresses(composition.to, "to")
    composition.cc = _addresses(composition.cc, "cc")
    composition.bcc = _addresses(composition.bcc, "bcc")
    composition.reply_to = _addresses(composition.reply_to, "reply_to")
    composition.from_address = from_address
    require(principal, Permission.MESSAGES_SEND)
    sender = sender_check(principal, from_address)
    content = composition_render(composition, message_id=message_id_new(from_address.rpartition("@")[2]))
    return message_queue(
        principal=principal,
        content=content,
        from_address=from_address,
        recipients=[*composition.to, *composition.cc, *composition.bcc],
        sender=sender,
    )


def raw_envelope(content: bytes) -> tuple[bytes, str, list[str]]:
    """A raw RFC 5322 send: (bytes without Bcc, the From address, To+Cc+Bcc addresses).

    A missing Date or Message-ID is added (RFC 6409 section 8 lets submission do so)."""
    parsed: Message = message_from_bytes(content, policy=email.policy.compat32)
    senders = email.utils.getaddresses(parsed.get_all("From", []))
    if len(senders) != 1 or not senders[0][1]:
        raise SendRefused("invalid_message", "The message needs exactly one From address.")
    recipients = [
        address
        for _, address in email.utils.getaddresses(
            parsed.get_all("To", []) + parsed.get_all("Cc", []) + parsed.get_all("Bcc", [])
        )
        if address
    ]
    headers, separator, body = content.partition(b"\r\n\r\n")
    if not separator:
        headers, separator, body = content.partition(b"\n\n")
        headers, body = headers.replace(b"\n", b"\r\n"), body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    # Drop Bcc (RFC 5322 section 3.6.3), with its folded continuation lines.
    lines, skipping = [], False
    for line in headers.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                lines.append(line)
            continue
        skipping = line.lower().startswith(b"bcc:")
        if not skipping:
            lines.append(line)
    domain = senders[0][1].rpartition("@")[2].lower() or "localhost"
    if parsed.get("Date") is None:
        lines.append(f"Date: {email.utils.formatdate(usegmt=True)}".encode())
    if parsed.get("Message-ID") is None:
        lines.append(f"Message-ID: {message_id_new(domain)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body, senders[0][1], recipients


def event_outbound(recipient: Recipient, event_type: str, data: dict[str, Any]) -> None:
    event_record(
        tenant_id=recipient.tenant_id,
        type=event_type,
        data={"outbound_id": str(recipient.message_id), "recipient": recipient.address, **data},
        trace_id=str(recipient.message_id),
    )


def domain_sending_set(*, principal: Principal, domain: Domain, any_local_part: bool) -> DomainSending:
    """Whether any address of ``domain`` may send, or only its mailboxes' (``domains:manage``)."""
    require(principal, Permission.DOMAINS_MANAGE)
    if not principal.may_manage_domain(domain.pk):
        raise PermissionDenied("This key may not manage this domain.")
    policy, _ = DomainSending.objects.get_or_create(domain=domain, defaults={"tenant_id": domain.tenant_id})
    before = policy.any_local_part
    policy.any_local_part = any_local_part
    policy.save(update_fields=["any_local_part", "updated_at"])
    audit_entry_record(
        tenant_id=domain.tenant_id,
        actor=principal.actor,
        action="domain.sending_update",
        resource_type="domain",
        resource_id=domain.pk,
        before={"any_local_part": before},
        after={"any_local_part": any_local_part},
    )
    return policy
