"""The sent copy: a message sent from a mailbox's address joins that mailbox's threads.

Stored like received mail (the raw bytes in blob storage, a Message row with ``is_sent``),
then parsed by the same pipeline, which threads it by In-Reply-To/References.
"""

from __future__ import annotations

import hashlib
from uuid import UUID

from django.db import transaction
from django.utils import timezone

from ingest.services import raw_storage_key
from mailboxes.blobs import blob_put
from mailboxes.models import Message
from mailplatform.enqueue import tasks_enqueue_on_commit
from outbound.models import OutboundMessage


def sent_copy_store(outbound_id: UUID) -> Message | None:
    """Store the sent copy once (a second call finds it); None without a sender mailbox."""
    from mailboxes.tasks import message_parse

    outbound = OutboundMessage.objects.filter(pk=outbound_id).first()
    if outbound is None or outbound.mailbox_id is None:
        return None
    if outbound.sent_message_id is not None:
        return Message.objects.filter(pk=outbound.sent_message_id).first()
    content = bytes(outbound.content)
    sha256 = hashlib.sha256(content).hexdigest()
    key = raw_storage_key(str(outbound.tenant_id), outbound.created_at.timestamp(), sha256)
    blob_put(key, content)
    with transaction.atomic():
        outbound = OutboundMessage.objects.select_for_update().get(pk=outbound_id)
        if outbound.sent_message_id is not None:
            return Message.objects.filter(pk=outbound.sent_message_id).first()
        message = Message(
            tenant_id=outbound.tenant_id,
            mailbox_id=outbound.mailbox_id,
            state=Message.State.STORED,
            source=Message.Source.API,
            mail_from=outbound.from_address,
            rcpt=outbound.from_address,
            size=len(content),
            sha256=sha256,
            storage_key=key,
            trace_id=f"out-{outbound.pk.hex}"[:64],
            received_at=outbound.created_at or timezone.now(),
            is_sent=True,
            is_read=True,
        )
        try:
            from mailboxes.uids import messages_uids_assign
        except ImportError:  # pragma: no cover - an older tree without IMAP UIDs
            pass
        else:
            messages_uids_assign([message])
        message.save(force_insert=True)
        outbound.sent_message = message
        outbound.save(update_fields=["sent_message"])
        tasks_enqueue_on_commit(message_parse, [(str(message.pk),)])
    return message
