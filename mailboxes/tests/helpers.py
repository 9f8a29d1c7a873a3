"""Test helpers: put raw bytes where ingest would, and run the pipeline on them."""

from __future__ import annotations

import hashlib
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from django.db import transaction
from django.utils import timezone

from mailboxes import blobs, pipeline
from mailboxes.models import Message
from mailboxes.uids import mailbox_uids_take

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def simple_message(
    subject: str = "Hello",
    body: str = "Body text",
    *,
    sender: str = "Alice <alice@sender.example>",
    to: str = "inbox@acme.example.test",
    extra: str = "",
    message_id: str = "",
) -> bytes:
    message_id = message_id or f"<{uuid.uuid4().hex}@sender.example>"
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\n"
        f"Date: Tue, 01 Jul 2025 10:00:00 +0000\r\n{extra}Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()


def message_store(
    mailbox: Any, raw: bytes, *, tags: list[str] | None = None, received_at: datetime | None = None
) -> Message:
    """A ``stored`` Message with its raw object in blob storage, as the drainer leaves it."""
    received_at = received_at or timezone.now()
    digest = hashlib.sha256(raw).hexdigest()
    key = f"raw/{mailbox.tenant_id}/{received_at:%Y/%m/%d}/{digest}.eml"
    blobs.blob_put(key, raw)
    with transaction.atomic():
        return Message.objects.create(
            tenant_id=mailbox.tenant_id,
            mailbox=mailbox,
            uid=mailbox_uids_take(mailbox.pk, 1)[0],
            rcpt=mailbox.address,
            tags=tags or [],
            size=len(raw),
            sha256=digest,
            storage_key=key,
            trace_id=uuid.uuid4().hex[:20],
            received_at=received_at,
        )


def message_deliver(mailbox: Any, raw: bytes, **kwargs: Any) -> Message:
    """Store, parse and index one message in this process; returns it refreshed."""
    message = message_store(mailbox, raw, **kwargs)
    pipeline.message_parse(message_id=message.pk)
    pipeline.message_index(message_id=message.pk)
    message.refresh_from_db()
    return message


def messages_wait_stored(count: int, timeout: float = 30) -> list[Message]:
    """Every message, oldest first, once a drainer (runsmtp's, in another process) stored ``count``."""
    deadline = time.monotonic() + timeout
    while True:
        messages = list(Message.objects.order_by("received_at"))
        if len(messages) >= count:
            return messages
        assert time.monotonic() < deadline, f"{len(messages)} of {count} messages drained"
        time.sleep(0.1)
