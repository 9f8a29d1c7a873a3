"""Antivirus after the 250: the scan step of the parse, rescans, and what each mode does.

Modes (``tenants.models.AntivirusMode``; the domain's, else the tenant's, else ANTIVIRUS_MODE):

- ``reject``: scanned by the SMTP server before the 250 (ingest/smtp.py); what comes in
  another way (API upload, IMAP pull, accepted fail-open) is scanned here and quarantined
  when infected: there is no sender left to refuse.
- ``quarantine``: infected mail is quarantined before it is parsed (its attachments are never
  stored apart from the raw message), with the event ``message.quarantined`` and the reason
  ``virus``.
- ``tag``: infected mail is parsed as usual and tagged ``virus``.
- ``off``: not scanned (nor when CLAMD_URL is empty).

Too large for the scanner (``too_large``) is treated like infected in the quarantine and
reject modes (the reason ``unscanned``), and tagged ``unscanned`` in tag mode: never clean.
clamd unavailable (``error``): tag mode goes on with the verdict ``error`` and the tag
``unscanned``, and the rescan sweeper scans it again; quarantine and reject modes hold the
message (the parse is retried, then the stuck sweeper takes over) unless ANTIVIRUS_FAIL_OPEN,
which goes on like tag mode and quarantines on the rescan if it then finds a virus.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from audit.services import audit_entry_record
from mailboxes.models import AntivirusVerdict, Mailbox, Message
from mailplatform import clamd
from tenants.access import Permission, Principal
from tenants.services import require

logger = logging.getLogger(__name__)

VIRUS_TAG = "virus"
UNSCANNED_TAG = "unscanned"
RESCAN_AFTER = timedelta(seconds=60)  # a failed scan is tried again this long after
RESCAN_BATCH = 200


class ScannerUnavailable(Exception):
    """clamd could not scan a message whose mode holds it until it can (fail closed)."""


@dataclass
class Screen:
    """What the scan step decided for one message, applied by the parse in its own UPDATE."""

    fields: dict[str, object] = field(default_factory=dict)  # the verdict columns
    tags: set[str] = field(default_factory=set)
    quarantine: str = ""  # the reason, when the message goes to quarantine instead of on
    signature: str = ""


_MODE_CACHE_SECONDS = 5.0  # as stale as the SMTP directory's snapshot may be
_modes: dict[UUID, tuple[str, float]] = {}


def mailbox_mode(mailbox_id: UUID, *, cached: bool = False) -> str:
    """The mode for a mailbox's mail: its domain's, else its tenant's, else ANTIVIRUS_MODE.

    ``cached``: the parse's look-up, remembered a few seconds per process (a change reaches
    the parse as soon as it reaches SMTP's directory); a rescan always asks the database.
    """
    now = time.monotonic()
    if cached and (hit := _modes.get(mailbox_id)) is not None and hit[1] > now:
        return hit[0]
    row = Mailbox.objects.filter(pk=mailbox_id).values_list("domain__antivirus_mode", "tenant__antivirus_mode").first()
    mode = str((row and (row[0] or row[1])) or settings.ANTIVIRUS_MODE)
    if len(_modes) > 10_000:
        _modes.clear()
    _modes[mailbox_id] = (mode, now + _MODE_CACHE_SECONDS)
    return mode


def verdict_summary(verdict: str, signature: str) -> dict[str, str]:
    """What ``indexer.indexed`` carries: the verdict as the API names it and clamd's signature."""
    return {"verdict": verdict or "not_scanned", "signature": signature if verdict == AntivirusVerdict.INFECTED else ""}


def _verdict_fields(result: clamd.ScanResult) -> dict[str, object]:
    return {
        "antivirus_verdict": result.verdict,
        "antivirus_signature": result.signature,
        "antivirus_scanned_at": timezone.now(),
    }


def _consequence(verdict: str, signature: str, mode: str) -> Screen:
    """What ``verdict`` means for a message in ``mode`` (see the module docstring)."""
    strict = mode in {"quarantine", "reject"}
    screen = Screen(signature=signature)
    if verdict == AntivirusVerdict.INFECTED:
        if strict:
            screen.quarantine = "virus"
        else:
            screen.tags.add(VIRUS_TAG)
    elif verdict == AntivirusVerdict.TOO_LARGE:
        if strict:
            screen.quarantine = "unscanned"
        else:
            screen.tags.add(UNSCANNED_TAG)
    elif verdict == AntivirusVerdict.ERROR:
        screen.tags.add(UNSCANNED_TAG)
    return screen


def message_screen(*, message: Message, raw: bytes) -> Screen:
    """The scan step of the parse (one call site: mailboxes.pipeline.message_parse).

    Uses the verdict made before the 250 when there is one; otherwise asks clamd. Raises
    :class:`ScannerUnavailable` when clamd is down and the mode holds the message.
    """
    if not clamd.configured() or message.mailbox_id is None:
        return Screen()
    mode = mailbox_mode(message.mailbox_id, cached=True)
    if mode == "off":
        return Screen()
    verdict, signature = message.antivirus_verdict, message.antivirus_signature
    fields: dict[str, object] = {}
    if verdict in {"", AntivirusVerdict.ERROR}:
        result = clamd.scan(raw, stage="pipeline")
        if result.verdict == AntivirusVerdict.ERROR and mode != "tag" and not settings.ANTIVIRUS_FAIL_OPEN:
            raise ScannerUnavailable(result.error)
        verdict, signature, fields = result.verdict, result.signature, _verdict_fields(result)
    screen = _consequence(verdict, signature, mode)
    screen.fields = fields
    return screen


def message_rescan(
    *, message_id: UUID | str, stage: str = "rescan", principal: Principal | None = None
) -> Message | None:
    """Scan a message again (the API's rescan, the sweeper); None if it is gone or deleted.

    With a ``principal`` (the API), it needs ``messages:write`` and is audited
    (``message.rescan``, with the verdict).

    Stores the new verdict and applies the mode: infected mail is quarantined (quarantine and
    reject modes) or tagged ``virus`` (tag mode); a clean answer lifts the tags ``virus`` and
    ``unscanned``. A quarantined message stays quarantined. With clamd unavailable the verdict
    becomes ``error`` (a rescan stays due) and the message is otherwise left as it was.
    """
    from mailboxes.pipeline import RawMissing, message_quarantine, raw_read

    if principal is not None:
        require(principal, Permission.MESSAGES_WRITE)
    message = Message.objects.filter(pk=message_id, deleted_at__isnull=True).first()
    if message is None or message.mailbox_id is None:
        return None
    try:
        raw = raw_read(message)
    except RawMissing:
        return message
    result = clamd.scan(raw, stage=stage)
    screen = _consequence(result.verdict, result.signature, mailbox_mode(message.mailbox_id))
    with transaction.atomic():
        current = Message.objects.select_for_update().filter(pk=message.pk, deleted_at__isnull=True).first()
        if current is None:
            return None
        tags = [tag for tag in current.tags if result.verdict == "error" or tag not in {VIRUS_TAG, UNSCANNED_TAG}]
        tags += sorted(screen.tags - set(tags)) if not screen.quarantine else []
        Message.objects.filter(pk=current.pk).update(tags=tags, **_verdict_fields(result))
        if principal is not None:
            audit_entry_record(
                tenant_id=current.tenant_id,
                actor=principal.actor,
                action="message.rescan",
                resource_type="message",
                resource_id=current.pk,
                before={"verdict": current.antivirus_verdict, "signature": current.antivirus_signature},
                after={"verdict": result.verdict, "signature": result.signature},
            )
    if screen.quarantine and current.state != Message.State.QUARANTINED:
        message_quarantine(
            message_id=current.pk,
            reason=screen.quarantine,
            extra={"signature": result.signature} if result.signature else None,
            from_states=(Message.State.STORED, Message.State.PARSED, Message.State.INDEXED),
        )
    logger.info("rescanned %s: %s %s", current.pk, result.verdict, result.signature)
    return Message.objects.get(pk=current.pk)


def messages_rescan_due(*, limit: int = RESCAN_BATCH, older_than: timedelta = RESCAN_AFTER) -> int:
    """The sweeper: rescan messages whose scan failed (clamd was down); returns how many."""
    if not clamd.configured():
        return 0
    due = list(
        Message.objects.filter(
            antivirus_verdict=AntivirusVerdict.ERROR,
            antivirus_scanned_at__lte=timezone.now() - older_than,
            deleted_at__isnull=True,
        )
        .order_by("antivirus_scanned_at")
        .values_list("pk", flat=True)[:limit]
    )
    done = 0
    for message_id in due:
        rescanned = message_rescan(message_id=message_id, stage="sweeper")
        done += 1
        if rescanned is not None and rescanned.antivirus_verdict == AntivirusVerdict.ERROR:
            break  # clamd is still down: the next sweep tries again
    return done
