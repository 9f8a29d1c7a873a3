"""Reads of the web side. Tenant data is always read through a Principal (tenants.access)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from audit.services import Actor
from mailboxes.models import Message
from mailboxes.selectors import message_list
from tenants.access import Permission, Principal
from tenants.models import Membership, Tenant, User
from tenants.selectors import sso_provider_for_email
from webinbox.models import SessionGeneration, TempInbox


def session_generation_of(user: Any) -> int:
    row = SessionGeneration.objects.filter(user_id=user.pk).values_list("generation", flat=True).first()
    return int(row or 0)


def sso_tenant_for_email(email: str) -> Tenant | None:
    """The tenant whose own SSO signs this address in, if any.

    The one place that decides "continue with your company's SSO" on /login/: an enabled
    provider of an enterprise tenant claims the address's domain.
    """
    provider = sso_provider_for_email(email)
    return provider.tenant if provider is not None else None


def sso_required_for(email: str) -> bool:
    """Whether magic links are off for this address (its tenant requires SSO)."""
    provider = sso_provider_for_email(email)
    return provider is not None and provider.require_sso


# --- Temporary inboxes ------------------------------------------------------------------
def temp_inbox_by_token(token: str) -> TempInbox | None:
    """The live temporary inbox the token opens, or None (unknown, malformed or expired alike).

    One indexed lookup by the token's hash in every case, so a wrong token costs what a
    right one does.
    """
    token_hash = hashlib.sha256(token.encode()).hexdigest()
    temp_inbox = (
        TempInbox.objects.select_related("mailbox", "mailbox__tenant", "mailbox__domain")
        .filter(token_hash=token_hash, mailbox__expires_at__gt=timezone.now())
        .first()
    )
    return temp_inbox


def temp_inbox_principal(temp_inbox: TempInbox) -> Principal:
    """Who a temporary-inbox link holder is: read and write on that one mailbox only."""
    mailbox = temp_inbox.mailbox
    return Principal(
        tenant=mailbox.tenant,
        permissions=frozenset({Permission.MESSAGES_READ, Permission.MESSAGES_WRITE}),
        actor=Actor.system("temporary inbox"),
        granted_domain_ids=frozenset(),
        granted_mailbox_ids=frozenset({mailbox.pk}),
        mailbox_domain_ids=frozenset({mailbox.domain_id}),
    )


# --- Console ------------------------------------------------------------------------------
def console_membership(user: User, tenant_slug: str) -> Membership:
    """The user's membership in the tenant with this slug; Membership.DoesNotExist otherwise."""
    return Membership.objects.select_related("tenant", "user").get(user=user, tenant__slug=tenant_slug)


# --- Message lists -----------------------------------------------------------------------
PAGE_SIZE = 50


@dataclass(frozen=True)
class MessagePage:
    messages: list[Message]
    older: str | None  # the keyset cursor of the next (older) page
    newest_created: datetime | None


def _cursor(message: Message) -> str:
    return f"{message.received_at.isoformat()}|{message.pk}"


def _cursor_parse(value: str) -> tuple[datetime, UUID] | None:
    try:
        when_text, id_text = value.split("|", 1)
        when = parse_datetime(when_text.replace(" ", "+"))
        return (when, UUID(id_text)) if when is not None else None
    except ValueError:
        return None


def message_page(
    principal: Principal, *, mailbox_id: UUID | None = None, query: str = "", before: str = ""
) -> MessagePage:
    """One page of messages, newest first, with a keyset cursor (fast at any depth).

    Raises mailboxes.search.QuerySyntaxError for a malformed query.
    """
    queryset: QuerySet[Message] = message_list(principal, mailbox_id=mailbox_id, query=query).select_related("mailbox")
    position = _cursor_parse(before) if before else None
    if position is not None:
        when, message_id = position
        queryset = queryset.filter(Q(received_at__lt=when) | Q(received_at=when, id__lt=message_id))
    rows = list(queryset[: PAGE_SIZE + 1])
    older = _cursor(rows[PAGE_SIZE - 1]) if len(rows) > PAGE_SIZE else None
    rows = rows[:PAGE_SIZE]
    newest = max((row.created_at for row in rows), default=None)
    return MessagePage(rows, older, newest)


def messages_changed_since(principal: Principal, *, mailbox_id: UUID | None, since: datetime) -> bool:
    """The cheap "anything new?" check behind live updates: a message arrived after ``since``."""
    queryset = message_list(principal, mailbox_id=mailbox_id).filter(created_at__gt=since)
    return queryset.exists()
