"""Writes to mailboxes. Each checks the principal, validates, saves, records events and audits."""

from __future__ import annotations

import re
import secrets
from datetime import datetime
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction

from audit.services import audit_entry_record, event_record
from mailboxes.models import Mailbox, Message
from tenants.access import Permission, Principal
from tenants.models import Domain
from tenants.services import require

# RFC 5321 section 4.1.2 dot-string, minus "+": plus-addressing ("box+tag@") reaches "box",
# so a mailbox name containing "+" could never receive mail.
_LOCAL_PART = re.compile(r"^[a-z0-9!#$%&'*/=?^_`{|}~-]+(\.[a-z0-9!#$%&'*/=?^_`{|}~-]+)*$")
_RANDOM_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no look-alikes (l/1, o/0)
RESERVED_LOCAL_PARTS = frozenset({"postmaster", "abuse"})
_FIELDS = ("address", "name", "kind", "is_catch_all", "expires_at", "retention_days")


def local_part_normalize(local_part: str) -> str:
    candidate = local_part.strip().lower()
    if not candidate or len(candidate) > 64 or not _LOCAL_PART.match(candidate):
        raise ValidationError(
            {"local_part": "Use letters, digits and . _ - (no '+', which is for tags), at most 64 characters."},
            code="invalid",
        )
    return candidate


def random_local_part(bits: int = 80) -> str:
    """A local part with at least ``bits`` bits of randomness (5 bits a character)."""
    return "".join(secrets.choice(_RANDOM_ALPHABET) for _ in range(-(-bits // 5)))


def _summary(mailbox: Mailbox) -> dict[str, Any]:
    return {name: getattr(mailbox, name) for name in _FIELDS}


def mailbox_create(
    *,
    principal: Principal,
    domain: Domain,
    local_part: str | None = None,
    name: str = "",
    kind: str = Mailbox.Kind.STANDARD,
    is_catch_all: bool = False,
    expires_at: datetime | None = None,
    retention_days: int | None = None,
) -> Mailbox:
    """Create a mailbox on one of the principal's domains; a random address if none is given."""
    require(principal, Permission.MAILBOXES_MANAGE)
    if domain.tenant_id != principal.tenant.pk or not principal.may_use_domain(domain.pk):
        raise PermissionDenied("This key cannot create mailboxes on that domain.")
    if is_catch_all:
        _catch_all_require(principal, domain)
    local = local_part_normalize(local_part) if local_part else random_local_part()
    if local in RESERVED_LOCAL_PARTS:
        raise ValidationError({"local_part": f"{local}@ is reserved for the platform."})
    mailbox = Mailbox(
        tenant_id=domain.tenant_id,
        domain=domain,
        local_part=local,
        address=f"{local}@{domain.name}",
        name=name,
        kind=kind,
        is_catch_all=is_catch_all,
        expires_at=expires_at,
        retention_days=retention_days,
    )
    mailbox.full_clean(validate_unique=False, validate_constraints=False)
    try:
        with transaction.atomic():
            mailbox.save(force_insert=True)
            event_record(
                tenant_id=mailbox.tenant_id,
                type="mailbox.created",
                data={"address": mailbox.address, "kind": mailbox.kind},
                domain_id=domain.pk,
                mailbox_id=mailbox.pk,
            )
            audit_entry_record(
                tenant_id=mailbox.tenant_id,
                actor=principal.actor,
                action="mailbox.create",
                resource_type="mailbox",
                resource_id=mailbox.pk,
                after=_summary(mailbox),
            )
    except IntegrityError:
        if is_catch_all and Mailbox.objects.filter(domain=domain, is_catch_all=True).exists():
            raise ValidationError(
                {"is_catch_all": "This domain already has a catch-all mailbox."}, code="unique"
            ) from None
        raise ValidationError({"local_part": "This address already exists."}) from None
    return mailbox


_EDITABLE = frozenset({"name", "is_catch_all", "expires_at", "retention_days"})


def _catch_all_require(principal: Principal, domain: Domain) -> None:
    """Which mailbox is the catch-all is the domain's setting, not the mailbox's: it reads the
    mail of every unknown address of the domain, so a key scoped to one mailbox cannot set it."""
    if not principal.may_manage_domain(domain.pk):
        raise PermissionDenied("The catch-all is a domain-wide setting: it needs domains:manage on the domain itself.")


def mailbox_update(*, principal: Principal, mailbox: Mailbox, **changes: Any) -> Mailbox:
    require(principal, Permission.MAILBOXES_MANAGE)
    if "is_catch_all" in changes and bool(changes["is_catch_all"]) != mailbox.is_catch_all:
        _catch_all_require(principal, mailbox.domain)
    before = _summary(mailbox)
    for field, value in changes.items():
        if field not in _EDITABLE:
            raise ValidationError({field: "This field cannot be changed."})
        setattr(mailbox, field, value)
    mailbox.full_clean(validate_unique=False, validate_constraints=False)
    try:
        with transaction.atomic():
            mailbox.save(update_fields=[*changes, "updated_at"])
            audit_entry_record(
                tenant_id=mailbox.tenant_id,
                actor=principal.actor,
                action="mailbox.update",
                resource_type="mailbox",
                resource_id=mailbox.pk,
                before=before,
                after=_summary(mailbox),
            )
    except IntegrityError:
        raise ValidationError({"is_catch_all": "This domain already has a catch-all mailbox."}) from None
    return mailbox


def mailbox_delete(*, principal: Principal, mailbox: Mailbox) -> None:
    """Delete a mailbox and, with it, its mail.

    The mail is soft-deleted in the same transaction (hidden at once) and purged with its
    blobs by the retention sweeper, enqueued on commit (mailboxes/retention.py).
    """
    from mailboxes.retention import mailbox_messages_soft_delete

    require(principal, Permission.MAILBOXES_MANAGE)
    with transaction.atomic():
        hidden = mailbox_messages_soft_delete(mailbox_id=mailbox.pk, reason="mailbox deleted")
        event_record(
            tenant_id=mailbox.tenant_id,
            type="mailbox.deleted",
            data={"address": mailbox.address, "messages": hidden},
            domain_id=mailbox.domain_id,
            mailbox_id=mailbox.pk,
        )
        audit_entry_record(
            tenant_id=mailbox.tenant_id,
            actor=principal.actor,
            action="mailbox.delete",
            resource_type="mailbox",
            resource_id=mailbox.pk,
            before=_summary(mailbox),
        )
        mailbox.delete()
        transaction.on_commit(_purge_enqueue, robust=True)


def _purge_enqueue() -> None:
    from mailboxes.tasks import messages_retention_sweep

    messages_retention_sweep.delay()  # the beat runs it anyway; this only makes it sooner


# --- Messages --------------------------------------------------------------------------
def message_update(*, principal: Principal, message: Message, keep_case: bool = False, **changes: Any) -> Message:
    """Mark a message read or unread, replace its tags, or (IMAP) mark it ``\\Deleted``.

    Tags are lowercased, except with ``keep_case`` (IMAP keywords keep the client's case,
    RFC 3501 section 2.3.2); either way no two tags differ only in case.
    """
    require(principal, Permission.MESSAGES_WRITE)
    fields = []
    if "is_read" in changes:
        message.is_read = bool(changes.pop("is_read"))
        fields.append("is_read")
    if "tags" in changes:
        by_case = {str(tag).lower(): str(tag) if keep_case else str(tag).lower() for tag in changes.pop("tags")}
        message.tags = sorted(by_case.values())
        fields.append("tags")
    if "imap_deleted" in changes:
        message.imap_deleted = bool(changes.pop("imap_deleted"))
        fields.append("imap_deleted")
    if changes:
        raise ValidationError({name: "This field cannot be changed." for name in changes})
    if fields:
        with transaction.atomic():
            message.save(update_fields=fields)
            audit_entry_record(
                tenant_id=message.tenant_id,
                actor=principal.actor,
                action="message.update",
                resource_type="message",
                resource_id=message.pk,
                after={field: getattr(message, field) for field in fields},
            )
    return message


def message_delete(*, principal: Principal, message: Message, reason: str = "deleted through the API") -> None:
    """Soft-delete a message (event ``message.deleted``); the purge sweeper removes its blobs.

    ``reason`` says how (the message's state reason and the event's): the IMAP and POP3
    servers name their command.
    """
    from mailboxes.retention import message_soft_delete

    require(principal, Permission.MESSAGES_WRITE)
    with transaction.atomic():
        if message_soft_delete(message, reason=reason):
            audit_entry_record(
                tenant_id=message.tenant_id,
                actor=principal.actor,
                action="message.delete",
                resource_type="message",
                resource_id=message.pk,
                before={"mailbox": message.mailbox_id, "trace_id": message.trace_id},
            )
