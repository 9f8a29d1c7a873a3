"""Bounces: DSNs (RFC 3464) that come back through our own SMTP ingest.

Every recipient is sent with the return path ``bounces+<recipient id>@OUTBOUND_BOUNCE_DOMAIN``
(VERP). That domain is served by a platform-owned tenant whose one mailbox, ``bounces``,
takes every ``bounces+<tag>`` address through plus-addressing, so the recipient directory,
the spool and the drainer treat DSNs like any mail. Once a DSN is stored, its
``ingest.received`` event makes the listener below enqueue :func:`bounce_process`, which
reads the ``message/delivery-status`` part (the standard library parses it) and marks the
recipient ``bounced`` (Action: failed) with the reason; a permanent failure (5.x.x) and a
complaint (RFC 5965 ``message/feedback-report``) put the address on the tenant's suppression
list. A DSN naming no recipient of ours is left in the mailbox for the staff to read.
"""

from __future__ import annotations

import email
import email.policy
import logging
import re
import time
from dataclasses import dataclass
from email.message import Message as EmailMessage
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from mailplatform.enqueue import tasks_enqueue_on_commit

logger = logging.getLogger(__name__)

BOUNCE_TENANT_SLUG = "platform-bounces"
BOUNCE_LOCAL_PART = "bounces"
_cache: dict[str, tuple[str, float]] = {}


def bounce_mailbox_get_or_create() -> Any:
    """The platform's bounce mailbox (``bounces@OUTBOUND_BOUNCE_DOMAIN``); idempotent."""
    from mailboxes.models import Mailbox
    from tenants.models import Domain, Tenant

    # Made quietly (no audit entry, no event): the platform's own plumbing, not a tenant's act.
    try:
        with transaction.atomic():
            tenant, _ = Tenant.objects.get_or_create(slug=BOUNCE_TENANT_SLUG, defaults={"name": "Platform bounces"})
    except IntegrityError:
        tenant = Tenant.objects.get(slug=BOUNCE_TENANT_SLUG)
    domain = Domain.objects.filter(name=settings.OUTBOUND_BOUNCE_DOMAIN, tenant=tenant).first()
    if domain is None:
        domain, _ = Domain.objects.get_or_create(
            tenant=tenant,
            name=settings.OUTBOUND_BOUNCE_DOMAIN,
            defaults={"state": Domain.State.VERIFIED, "verified_at": timezone.now(), "platform_managed": True},
        )
    mailbox, _ = Mailbox.objects.get_or_create(
        domain=domain, local_part=BOUNCE_LOCAL_PART, defaults={"tenant": tenant, "name": "DSNs (VERP)"}
    )
    return mailbox


_ready: set[str] = set()


def bounce_mailbox_ensure() -> None:
    """The bounce mailbox exists (checked once per process and bounce domain)."""
    if settings.OUTBOUND_BOUNCE_DOMAIN not in _ready:
        bounce_mailbox_get_or_create()
        _ready.add(settings.OUTBOUND_BOUNCE_DOMAIN)


def _bounce_tenant_id() -> str | None:
    cached = _cache.get("tenant")
    if cached is not None and cached[1] > time.monotonic():
        return cached[0] or None
    from tenants.models import Tenant

    found = Tenant.objects.filter(slug=BOUNCE_TENANT_SLUG).values_list("pk", flat=True).first()
    # A missing tenant is asked again soon; a found one for longer (it is never deleted).
    _cache["tenant"] = (str(found) if found else "", time.monotonic() + (300 if found else 10))
    return str(found) if found else None


def bounce_events_listen(events: list[Any]) -> None:
    """Inside the drainer's transaction: each DSN stored in the bounce mailbox is processed
    after the commit."""
    received = [event for event in events if event.type == "ingest.received" and event.message_id]
    if not received:
        return
    tenant_id = _bounce_tenant_id()
    if tenant_id is None:
        return
    mine = [(str(event.message_id),) for event in received if str(event.tenant_id) == tenant_id]
    if mine:
        from outbound.tasks import bounce_process as task

        tasks_enqueue_on_commit(task, mine)


@dataclass(frozen=True)
class Report:
    """One recipient's lines of a DSN (RFC 3464 section 2.3) or a complaint."""

    action: str  # failed, delayed, delivered, relayed, expanded; "complaint" for ARF
    status: str  # the enhanced status code (RFC 3463), e.g. 5.1.1
    recipient: str
    diagnostic: str


def _field(block: EmailMessage, name: str) -> str:
    value = str(block.get(name, "") or "")
    # "rfc822; user@example.org", "smtp; 550 5.1.1 ..." (the type before the ';').
    return " ".join(value.partition(";")[2].split()) if ";" in value else " ".join(value.split())


def dsn_parse(raw: bytes) -> list[Report]:
    """The per-recipient reports of a DSN, or one ``complaint`` report of an ARF message."""
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    reports: list[Report] = []
    for part in message.walk():
        content_type = part.get_content_type()
        if content_type == "message/delivery-status":
            payload = part.get_payload()
            blocks = (
                [block for block in payload if isinstance(block, EmailMessage)] if isinstance(payload, list) else []
            )
            # blocks[0] is the per-message part; one block per recipient after it.
            for block in blocks[1:]:
                reports.append(
                    Report(
                        action=str(block.get("Action", "")).strip().lower(),
                        status=str(block.get("Status", "")).strip(),
                        recipient=_field(block, "Final-Recipient") or _field(block, "Original-Recipient"),
                        diagnostic=_field(block, "Diagnostic-Code")[:900],
                    )
                )
        elif content_type == "message/feedback-report":
            payload = part.get_payload()
            first = payload[0] if isinstance(payload, list) and payload else None
            block = first if isinstance(first, EmailMessage) else part
            reports.append(
                Report(
                    action="complaint",
                    status="",
                    recipient=_field(block, "Original-Rcpt-To") or _field(block, "Removal-Recipient"),
                    diagnostic=str(block.get("Feedback-Type", "abuse")).strip()[:100],
                )
            )
    return reports


_TAG = re.compile(r"^[0-9a-f]{32}$")


def bounce_process(message_id: str) -> int:
    """Apply one stored DSN to the recipient its VERP address names; how many changed."""
    from mailboxes.blobs import blob_get
    from mailboxes.models import Message
    from outbound.models import Recipient, Suppression
    from outbound.services import event_outbound, suppression_record

    stored = Message.objects.filter(pk=message_id).first()
    if stored is None:
        return 0
    tags = [tag for tag in stored.tags if _TAG.match(str(tag))]
    if not tags:
        logger.info("bounce %s names no outbound recipient (%s)", message_id, stored.rcpt)
        return 0
    recipient = Recipient.objects.filter(pk=UUID(tags[0])).first()
    if recipient is None:
        return 0
    reports = dsn_parse(blob_get(stored.storage_key))
    changed = 0
    with transaction.atomic():
        recipient = Recipient.objects.select_for_update().get(pk=recipient.pk)
        for report in reports:
            if report.recipient and report.recipient.lower() != recipient.address.lower():
                continue
            if report.action == "failed" or report.action == "complaint":
                complaint = report.action == "complaint"
                reason = (
                    f"complaint ({report.diagnostic})"
                    if complaint
                    else " ".join(part for part in (report.status, report.diagnostic) if part)
                )
                if recipient.state != Recipient.State.BOUNCED or complaint:
                    recipient.state, recipient.bounced_at = Recipient.State.BOUNCED, timezone.now()
                    recipient.last_response = f"DSN: {reason}"[:1000]
                    recipient.claimed_until = None
                    recipient.save(update_fields=["state", "bounced_at", "last_response", "claimed_until"])
                    event_outbound(
                        recipient,
                        "outbound.bounced",
                        {"response": recipient.last_response, "status": report.status, "dsn": True},
                    )
                    changed += 1
                if complaint or report.status.startswith("5"):
                    suppression_record(
                        tenant_id=recipient.tenant_id,
                        address=recipient.address,
                        reason=Suppression.Reason.COMPLAINT if complaint else Suppression.Reason.HARD_BOUNCE,
                        detail=reason,
                    )
            elif report.action == "delayed":
                event_outbound(
                    recipient,
                    "outbound.deferred",
                    {"response": f"DSN: {report.status} {report.diagnostic}", "dsn": True},
                )
                changed += 1
    return changed
