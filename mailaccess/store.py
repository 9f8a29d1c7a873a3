"""What the IMAP and POP3 sessions read and write, as synchronous ORM calls.

The servers run these in the waiters' bounded database pool (``mailboxes.waiting.db``).
Every query goes through the principal's scope (``mailboxes.selectors.message_scope``);
flag changes and deletions go through the same services as the API (audited, evented).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any
from uuid import UUID

from django.db import connection
from django.db.models import BigIntegerField, Count, F, Max, OuterRef, QuerySet, Subquery, Value
from django.db.models.fields.json import KT, KeyTransform
from django.db.models.functions import Cast, Coalesce
from django.utils.dateparse import parse_datetime

from ingest.services import accept, spool_default, spool_entry_drain
from ingest.spool import Recipient
from mailaccess.auth import Access
from mailboxes.authentication import presented_bytes, presented_chunks
from mailboxes.blobs import blob_chunks, blob_get
from mailboxes.models import Mailbox, Message
from mailboxes.pipeline import message_parse
from mailboxes.selectors import mailbox_list, message_scope
from mailboxes.services import message_delete, message_update
from mailboxes.waiting import wake_publish

SYSTEM_FLAG_TAGS = {"\\Flagged": "flagged", "\\Answered": "answered", "\\Draft": "draft"}
TAG_SYSTEM_FLAGS = {tag: flag for flag, tag in SYSTEM_FLAG_TAGS.items()}
logger = logging.getLogger(__name__)

# How a message left over IMAP or POP3: its state reason and its message.deleted event say so.
DELETED_EXPUNGE = "expunged over IMAP"
DELETED_MOVE = "moved over IMAP"
DELETED_DELE = "deleted over POP3"

SPOOL_MEMORY = 1024 * 1024  # a message body larger than this is spooled to disk, not memory


@dataclass(frozen=True)
class Row:
    pk: UUID
    uid: int
    is_read: bool
    tags: tuple[str, ...]
    size: int  # of the copy a client gets (see presented), not of the raw object
    deleted: bool
    received_at: datetime | None  # None in a light read
    storage_key: str
    # What the client's copy changes (mailboxes.authentication.presentation_of): our
    # Authentication-Results first, forged ones left out. None: the raw message as it is
    # (stored before verdicts, AUTH_VERIFY off), and in a light read.
    presented: dict[str, Any] | None = None

    @property
    def cache_key(self) -> str:
        """One copy per raw object and presentation (the same object may be verified apart)."""
        return self.storage_key + "\0" + str((self.presented or {}).get("field", ""))

    def flags(self) -> list[str]:
        return flags_of(self.is_read, self.tags, self.deleted)


def flags_of(is_read: bool, tags: tuple[str, ...] | list[str], deleted: bool = False) -> list[str]:
    """IMAP flags of a message: ``\\Seen`` from is_read, ``\\Deleted`` from imap_deleted,
    system flags and keywords from tags."""
    flags = (["\\Seen"] if is_read else []) + [TAG_SYSTEM_FLAGS.get(tag, tag) for tag in tags]
    return [*flags, "\\Deleted"] if deleted else flags


_ROW_FIELDS = ("pk", "uid", "is_read", "tags", "presented_size", "imap_deleted", "received_at", "storage_key")


NO_UID = 2**63 - 1  # above every UID: nothing held back


def unsettled_floor(mailbox_id: UUID | Any) -> Coalesce:
    """The mailbox's lowest UID still awaiting its parse (``stored``, its copy not settled by
    mailboxes.presentation), or :data:`NO_UID`: one probe of the small partial index
    ``message_uid_unsettled``, evaluated once per statement."""
    pending = Message.objects.filter(
        mailbox_id=mailbox_id, state=Message.State.STORED, imap_presentation__isnull=True, uid__isnull=False
    ).order_by("uid")
    return Coalesce(Subquery(pending.values("uid")[:1]), Value(NO_UID), output_field=BigIntegerField())


def visible(access: Access, mailbox_id: UUID) -> QuerySet[Message]:
    """The folder's messages a client sees: not deleted, not quarantined, numbered, and below
    the lowest UID still awaiting its parse.

    A message is served only once its copy is settled (verified, or shown unverified after
    mailboxes.presentation.UNVERIFIED_SHOWN_AFTER), so its bytes never change under its UID;
    and only the UID-ordered prefix before the first unsettled one, so a client never sees a
    UID appear below one it has seen (RFC 3501 section 2.3.1.1). Quarantined and deleted
    messages hold nothing back.
    """
    return (
        message_scope(access.principal)
        .filter(mailbox_id=mailbox_id, deleted_at__isnull=True, uid__isnull=False, uid__lt=unsettled_floor(mailbox_id))
        .exclude(state=Message.State.QUARANTINED)
    )


def presented(queryset: QuerySet[Message]) -> QuerySet[Message]:
    """With ``presented_size``, the size of the copy a client gets: the raw size plus the
    ``delta`` of what the copy changes (one integer out of the JSON, so a FETCH of
    RFC822.SIZE, a LIST or a STAT reads no message), and ``presented``: the copy settled
    without a verdict (``imap_presentation``) if there is one, else the verdict's."""
    delta = Cast(Coalesce(KT("imap_presentation__delta"), KT("authentication__presented__delta")), BigIntegerField())
    return queryset.annotate(
        presented_size=F("size") + Coalesce(delta, Value(0)),
        presented=Coalesce(F("imap_presentation"), KeyTransform("presented", "authentication")),
    )


def folder_mailbox(access: Access, mailbox_id: UUID) -> Mailbox | None:
    """The mailbox behind a folder, if the principal still sees it."""
    return mailbox_list(access.principal).filter(pk=mailbox_id).first()


def folder_uids(access: Access, mailbox_id: UUID) -> list[int]:
    return [int(uid or 0) for uid in visible(access, mailbox_id).order_by("uid").values_list("uid", flat=True)]


def folder_summary(access: Access, mailbox_id: UUID) -> tuple[int, int]:
    """(count, highest UID): a cheap "did anything change?" check."""
    summary = visible(access, mailbox_id).aggregate(count=Count("pk"), top=Max("uid"))
    return int(summary["count"]), int(summary["top"] or 0)


def unseen_count(access: Access, mailbox_id: UUID) -> int:
    return visible(access, mailbox_id).filter(is_read=False).count()


def rows(access: Access, mailbox_id: UUID, uids: list[int], *, light: bool = False) -> dict[int, Row]:
    """The messages of these UIDs that are still there.

    The scoped queryset writes the SQL; its rows are read with a plain cursor, without the
    ORM's per-value converters (a FETCH of 100,000 flags spends its time there otherwise).
    """
    found: dict[int, Row] = {}
    for start in range(0, len(uids), 20000):
        chunk = uids[start : start + 20000]
        queryset = presented(visible(access, mailbox_id).order_by())
        if len(chunk) > 1 and chunk[-1] - chunk[0] + 1 == len(chunk):
            queryset = queryset.filter(uid__gte=chunk[0], uid__lte=chunk[-1])
        else:
            queryset = queryset.filter(uid__in=chunk)
        # light: flags and sizes only (no dates to convert, no keys), for FLAGS/UID/RFC822.SIZE.
        fields = _ROW_FIELDS[:6] if light else (*_ROW_FIELDS, "presented")
        sql, params = queryset.values_list(*fields).query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            for values in cursor.fetchall():
                pk, uid, is_read, tags, size, deleted = values[:6]
                if isinstance(tags, str):
                    tags = () if tags == "[]" else json.loads(tags)
                received_at, storage_key, shown = (None, "", None) if light else values[6:]
                if isinstance(received_at, str):  # SQLite (make run's default) hands back text
                    received_at = _aware(parse_datetime(received_at))
                if isinstance(shown, str):
                    shown = json.loads(shown)
                found[int(uid)] = Row(
                    pk,
                    int(uid),
                    is_read,
                    tuple(tags or ()),
                    int(size),
                    bool(deleted),
                    received_at,
                    storage_key,
                    shown or None,
                )
    return found


def _aware(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def flag_rows(access: Access, mailbox_id: UUID, uids: list[int]) -> dict[int, tuple[bool, str, bool]]:
    """UID -> (is_read, tags as JSON text, \\Deleted): all a FETCH of UID and FLAGS needs, read in bulk."""
    found: dict[int, tuple[bool, str, bool]] = {}
    for start in range(0, len(uids), 50000):
        chunk = uids[start : start + 50000]
        queryset = visible(access, mailbox_id).order_by().filter(uid__gte=chunk[0], uid__lte=chunk[-1])
        sql, params = queryset.values_list("uid", "is_read", "tags", "imap_deleted").query.sql_with_params()
        wanted = set(chunk) if chunk[-1] - chunk[0] + 1 != len(chunk) else None
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            for uid, is_read, tags, deleted in cursor.fetchall():
                if wanted is None or uid in wanted:
                    found[uid] = (is_read, tags if isinstance(tags, str) else json.dumps(tags), bool(deleted))
    return found


def flags_by_id(access: Access, mailbox_id: UUID, message_ids: list[UUID]) -> dict[int, list[str]]:
    """UID -> IMAP flags of these messages (announced ones: new or with changed flags)."""
    found = visible(access, mailbox_id).filter(pk__in=message_ids).values_list("uid", "is_read", "tags", "imap_deleted")
    return {int(uid or 0): flags_of(is_read, tags or [], deleted) for uid, is_read, tags, deleted in found}


def search_rows(access: Access, mailbox_id: UUID) -> list[dict[str, Any]]:
    """Everything SEARCH may test, one dict per message, in UID order (``size``: of the
    copy a client gets, as RFC822.SIZE says)."""
    found = list(
        presented(visible(access, mailbox_id))  # type: ignore[arg-type,misc]
        .order_by("uid")
        .values(
            "uid",
            "is_read",
            "tags",
            "imap_deleted",
            "presented_size",
            "received_at",
            "date",
            "subject",
            "from_address",
            "from_name",
            "recipients_text",
            "text",
        )
    )
    for row in found:
        row["size"] = row.pop("presented_size")
    return found


def flags_store(access: Access, mailbox_id: UUID, uids: list[int], mode: str, flags: list[str]) -> dict[int, Row]:
    """STORE: set (mode ""), add ("+") or remove ("-") flags; the rows after the change.

    ``\\Seen`` is ``is_read`` and ``\\Deleted`` is ``imap_deleted``, both stored with the message
    so every session sees them; ``\\Flagged``, ``\\Answered``, ``\\Draft`` and keywords are tags.
    Keywords keep the case the client used and match case-insensitively (RFC 3501 section 2.3.2).
    Each changed message goes through ``message_update`` (audited, like the API).
    """
    wanted_seen = "\\Seen" in flags
    wanted_deleted = "\\Deleted" in flags
    wanted = {
        tag.lower(): tag
        for tag in (
            SYSTEM_FLAG_TAGS.get(flag, flag) for flag in flags if flag not in ("\\Seen", "\\Deleted", "\\Recent")
        )
    }
    messages = {int(message.uid or 0): message for message in visible(access, mailbox_id).filter(uid__in=uids)}
    for message in messages.values():
        tags = {tag.lower(): tag for tag in message.tags}
        is_read, deleted = message.is_read, message.imap_deleted
        if mode == "+":
            is_read, deleted = is_read or wanted_seen, deleted or wanted_deleted
            tags.update(wanted)
        elif mode == "-":
            is_read, deleted = is_read and not wanted_seen, deleted and not wanted_deleted
            tags = {low: tag for low, tag in tags.items() if low not in wanted}
        else:
            is_read, deleted = wanted_seen, wanted_deleted
            tags = {low: tag for low, tag in tags.items() if tag not in TAG_SYSTEM_FLAGS and not _is_keyword(tag)}
            tags.update(wanted)
        changes: dict[str, object] = {}
        if is_read != message.is_read:
            changes["is_read"] = is_read
        if deleted != message.imap_deleted:
            changes["imap_deleted"] = deleted
        if sorted(tags.values()) != sorted(message.tags):
            changes["tags"] = sorted(tags.values())
        if changes:
            message_update(principal=access.principal, message=message, keep_case=True, **changes)
            # IDLE clients on the folder hear of it: the wake-up that announces new mail.
            wake_publish(tenant_id=message.tenant_id, mailbox_id=mailbox_id, message_id=message.pk)
    return rows(access, mailbox_id, sorted(messages))


def _is_keyword(tag: str) -> bool:
    return bool(tag) and all(33 <= ord(char) < 127 and char not in '(){ %*"\\]' for char in tag)


def messages_seen(access: Access, mailbox_id: UUID, uids: list[int]) -> None:
    """A non-PEEK body fetch sets ``\\Seen`` (RFC 3501 section 6.4.5)."""
    for message in visible(access, mailbox_id).filter(uid__in=uids, is_read=False):
        message_update(principal=access.principal, message=message, is_read=True)


def messages_delete(
    access: Access, mailbox_id: UUID, uids: list[int] | None, *, reason: str, marked: bool = False
) -> list[int]:
    """EXPUNGE / MOVE / DELE: soft-delete through the API's service; the UIDs actually removed.

    ``uids`` None: every message of the folder; ``marked``: only those marked ``\\Deleted``
    (by any session: EXPUNGE and CLOSE, RFC 3501 section 6.4.3). ``reason`` names the
    command (one of the ``DELETED_*`` reasons), recorded on each message and its event.
    """
    removed = []
    queryset = visible(access, mailbox_id)
    if uids is not None:
        queryset = queryset.filter(uid__in=uids)
    if marked:
        queryset = queryset.filter(imap_deleted=True)
    for message in queryset.order_by("uid"):
        message_delete(principal=access.principal, message=message, reason=reason)
        removed.append(int(message.uid or 0))
    return removed


def message_append(access: Access, mailbox_id: UUID, content: bytes, *, ip: str | None, tls: bool) -> tuple[int, int]:
    """APPEND: the message enters through ``accept`` like any other mail, drained at once so
    its UID is known; returns (UIDVALIDITY, UID) for APPENDUID (RFC 4315)."""
    mailbox = mailbox_list(access.principal).get(pk=mailbox_id)
    spool = spool_default()
    queue_id = accept(
        content=content,
        mail_from="",
        recipients=[Recipient(address=mailbox.address, mailbox_id=str(mailbox.pk), tenant_id=str(mailbox.tenant_id))],
        remote_ip=ip,
        helo="imap-append",
        tls=tls,
        source=Message.Source.IMAP,
        spool=spool,
    )
    spool_entry_drain(spool, queue_id)
    message = Message.objects.get(mailbox_id=mailbox.pk, trace_id=queue_id)
    # Parsed here, not only by its queued task (which then finds nothing to do): a client is
    # shown a message once verified (see visible), and expects its APPENDUID there now.
    try:
        message_parse(message_id=message.pk, index=True)
    except Exception as exc:  # transient (blob storage, clamd): its task and the sweeper go on
        logger.warning("parse of appended %s left to its task: %s", message.pk, type(exc).__name__)
    return int(mailbox.uid_validity), int(message.uid or 0)


def mailbox_uid_state(mailbox_id: UUID) -> tuple[int, int]:
    """(UIDVALIDITY, UIDNEXT) of a mailbox. UIDNEXT is the lowest UID still awaiting its
    parse when there is one: a client fetching ``UIDNEXT:*`` next time must find it."""
    validity, uid_next, floor = (
        Mailbox.objects.filter(pk=mailbox_id)
        .annotate(floor=unsettled_floor(OuterRef("pk")))
        .values_list("uid_validity", "uid_next", "floor")
        .get()
    )
    return int(validity), min(int(uid_next), int(floor))


def message_spooled(row: Row) -> IO[bytes]:
    """The copy a client gets (:func:`mailboxes.authentication.presented_chunks`) in a
    seekable file: memory up to SPOOL_MEMORY, a temporary file beyond."""
    handle = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115 - the caller closes it
    for chunk in presented_chunks(blob_chunks(row.storage_key), row.presented):
        handle.write(chunk)
    handle.seek(0)
    return handle  # type: ignore[return-value]


def message_whole(row: Row) -> bytes:
    """The copy a client gets, in memory (a message under SPOOL_MEMORY)."""
    return presented_bytes(blob_get(row.storage_key), row.presented)
