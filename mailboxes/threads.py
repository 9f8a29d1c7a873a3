"""Conversation ids (RFC 5322 section 3.6.4: References and In-Reply-To).

The thread id is a digest of the conversation's root Message-ID: the first entry of
References, else In-Reply-To, else the message's own id. Messages that arrive out of order
still agree, as long as the references are complete. When a parent is already in the
mailbox, its thread id wins (clients that truncate References). A reply without any
reference headers ("Re: ..." from a client that drops them) falls back to the newest
message in the same mailbox with the same normalized subject in the last 30 days.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from uuid import UUID

from django.utils import timezone

from mailboxes.models import Message
from mailboxes.replies import subject_is_reply, subject_normalize

SUBJECT_FALLBACK_DAYS = 30


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:32]


def thread_id_compute(
    *,
    mailbox_id: UUID,
    message_pk: UUID,
    message_id: str,
    in_reply_to: str,
    references: list[str],
    subject: str,
) -> str:
    parents = [ref for ref in [in_reply_to, *reversed(references)] if ref]
    if parents:
        known = (
            Message.objects.filter(mailbox_id=mailbox_id, message_id__in=parents[:50])
            .exclude(thread_id="")
            .values_list("thread_id", flat=True)
            .first()
        )
        if known:
            return known
        return _digest(references[0] if references else in_reply_to)
    if subject_is_reply(subject):
        normalized = subject_normalize(subject)
        if normalized:
            since = timezone.now() - timedelta(days=SUBJECT_FALLBACK_DAYS)
            candidates = (
                Message.objects.filter(
                    mailbox_id=mailbox_id, received_at__gte=since, subject__icontains=normalized[:200]
                )
                .exclude(thread_id="")
                .exclude(pk=message_pk)
                .order_by("-received_at")
                .values_list("subject", "thread_id")[:50]
            )
            for candidate_subject, thread_id in candidates:
                if subject_normalize(candidate_subject) == normalized:
                    return thread_id
    return _digest(message_id or str(message_pk))
