"""Reads of mailboxes, always through the principal's scope."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

from django.db.models import QuerySet

from mailboxes.models import Mailbox, Message
from mailboxes.search import query_filter
from tenants.access import Principal


def mailbox_list(principal: Principal, *, domain_id: UUID | None = None) -> QuerySet[Mailbox]:
    """Mailboxes the principal can see, optionally on one domain."""
    queryset = principal.scope(Mailbox.objects.select_related("domain"), domain_field="domain", mailbox_field="pk")
    if domain_id is not None:
        queryset = queryset.filter(domain_id=domain_id)
    return queryset


def mailbox_get(principal: Principal, mailbox_id: UUID) -> Mailbox:
    """The mailbox, or Mailbox.DoesNotExist when it is missing or outside the scope."""
    return mailbox_list(principal).get(pk=mailbox_id)


# --- Messages ------------------------------------------------------------------------------
# Heavy columns a list never shows.
_LIST_DEFERRED = ("headers", "html", "text", "search_vector", "links", "references", "defects")


def message_scope(principal: Principal) -> QuerySet[Message]:
    """Every message the principal may see (not deleted), through the one choke point."""
    return principal.scope(
        Message.objects.filter(deleted_at__isnull=True), domain_field="mailbox__domain", mailbox_field="mailbox"
    )


def message_list(
    principal: Principal,
    *,
    mailbox_id: UUID | None = None,
    query: str = "",
    thread_id: str | None = None,
    after: datetime | None = None,
) -> QuerySet[Message]:
    """Messages the principal can see, newest first, optionally one mailbox's and matching ``query``.

    Raises :class:`mailboxes.search.QuerySyntaxError` for a malformed query.
    """
    queryset = message_scope(principal).defer(*_LIST_DEFERRED)
    if mailbox_id is not None:
        queryset = queryset.filter(mailbox_id=mailbox_id)
    if thread_id:
        queryset = queryset.filter(thread_id=thread_id)
    if after is not None:
        queryset = queryset.filter(received_at__gt=after)
    if query.strip():
        queryset = query_filter(queryset, query)
    return queryset.order_by("-received_at", "-id")


def message_get(principal: Principal, message_id: UUID) -> Message:
    """One message with its attachments, or Message.DoesNotExist."""
    return message_scope(principal).prefetch_related("attachments").get(pk=message_id)


def message_ready_newest(
    principal: Principal,
    *,
    mailbox_id: UUID | None,
    query: str = "",
    with_code: bool = False,
    message_id: UUID | None = None,
) -> tuple[UUID, datetime] | None:
    """(id, received_at) of the newest indexed message matching a waiter, or None.

    With ``message_id``: that message, if it matches. Used by :mod:`mailboxes.waiting`,
    which compares ``received_at`` with the waiter's ``after`` itself so that waiters asking
    the same question share one query.
    """
    queryset = message_list(principal, mailbox_id=mailbox_id, query=query).filter(state=Message.State.INDEXED)
    if with_code:
        queryset = queryset.exclude(codes=[])
    if message_id is not None:
        queryset = queryset.filter(pk=message_id)
    row = queryset.values_list("pk", "received_at").first()
    return (row[0], row[1]) if row is not None else None


def message_after_resolve(principal: Principal, value: str) -> datetime:
    """``after=``: an ISO 8601 time, or a message id (then: newer than that message)."""
    from django.utils.dateparse import parse_datetime

    try:
        return message_scope(principal).values_list("received_at", flat=True).get(pk=UUID(value))
    except (ValueError, Message.DoesNotExist):
        pass
    parsed = parse_datetime(value.replace(" ", "+"))
    if parsed is None:
        raise ValueError("after: expected an ISO 8601 time or a message id")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed
