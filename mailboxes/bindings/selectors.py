"""Reads of pools, bindings and providers, always through the principal's scope.

A key granted a pool sees that pool and its bindings; a key granted a domain sees the pools
on it; a key granted a mailbox sees the bindings of that mailbox. Nothing else.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.core.cache import cache
from django.db.models import Count, Exists, QuerySet
from django.utils import timezone

from mailboxes.bindings.attribution import provider_filter
from mailboxes.models import AccountBinding, AccountProvider, Mailbox, MailboxPool, Message, PoolMailbox
from mailplatform.ratelimit import count_add
from tenants import keys
from tenants.access import Principal

ACCOUNT_REF_MAX = AccountBinding._meta.get_field("account_ref").max_length or 200


def pool_list(principal: Principal) -> QuerySet[MailboxPool]:
    return principal.scope(MailboxPool.objects.select_related("domain"), domain_field="domain", pool_field="pk")


def pool_get(principal: Principal, pool_id: UUID) -> MailboxPool:
    """The pool, or MailboxPool.DoesNotExist when it is missing or outside the scope."""
    return pool_list(principal).get(pk=pool_id)


def binding_scope(principal: Principal) -> QuerySet[AccountBinding]:
    return principal.scope(
        AccountBinding.objects.select_related("pool", "mailbox"),
        domain_field="pool__domain",
        mailbox_field="mailbox",
        pool_field="pool",
    )


def binding_list(
    principal: Principal,
    *,
    account_ref: str | None = None,
    provider: str | None = None,
    mailbox_id: UUID | None = None,
    pool_id: UUID | None = None,
    active: bool | None = None,
) -> QuerySet[AccountBinding]:
    queryset = binding_scope(principal)
    if account_ref is not None:
        queryset = queryset.filter(account_ref=account_ref)
    if provider is not None:
        queryset = queryset.filter(provider=provider.strip().lower())
    if mailbox_id is not None:
        queryset = queryset.filter(mailbox_id=mailbox_id)
    if pool_id is not None:
        queryset = queryset.filter(pool_id=pool_id)
    if active is not None:
        queryset = queryset.filter(active=active)
    return queryset


def binding_by_link(principal: Principal, link: str) -> AccountBinding | None:
    """The active binding behind a link, within the principal's scope; None for an unknown,
    malformed, released or foreign link alike."""
    if not keys.is_well_formed(link, prefix=keys.LINK_PREFIX):
        return None
    candidates = binding_scope(principal).filter(
        link_prefix=keys.lookup_prefix(link, prefix=keys.LINK_PREFIX), active=True
    )
    for binding in candidates:
        if keys.matches(link, binding.link_hash):
            return binding
    return None


def binding_one(queryset: QuerySet[AccountBinding]) -> AccountBinding | None:
    """The one row of a lookup by the active-account index, unordered: ``first()`` would add the
    list's ORDER BY created_at, and the planner could walk the tenant's bindings in that order."""
    return next(iter(queryset.order_by()[:1]), None)


def binding_for_account(principal: Principal, account_ref: str, provider: str | None = None) -> AccountBinding | None:
    if "\x00" in account_ref or len(account_ref) > ACCOUNT_REF_MAX:
        return None  # no stored account_ref is like that (link-or-create refuses it): not found
    binding = binding_one(binding_scope(principal).filter(account_ref=account_ref, active=True))
    if binding is None or (provider and binding.provider != provider.strip().lower()):
        return None
    return binding


def provider_list(principal: Principal) -> QuerySet[AccountProvider]:
    return principal.scope(AccountProvider.objects.all())


def pool_mailboxes(pool: MailboxPool) -> QuerySet[PoolMailbox]:
    """A pool's members with their mailboxes (the pool already came through the scope)."""
    return PoolMailbox.objects.filter(pool=pool).select_related("mailbox").order_by("mailbox__address")


# --- The code proxy -----------------------------------------------------------------------
class ProviderNotConfigured(Exception):
    """A shared mailbox, and the account's provider has no rules to tell its mail apart."""


@dataclass(frozen=True)
class CodeQuestion:
    """What a code waiter of one binding looks for (plain values: it runs in the pool threads).

    ``sender_domains`` and ``subject_patterns``: the provider's rules, read once when the wait
    starts (:func:`code_question_for`), so each look is one query.
    """

    binding_id: UUID
    tenant_id: UUID
    mailbox_id: UUID
    provider: str
    after: datetime
    sender_domains: tuple[str, ...] = ()
    subject_patterns: tuple[str, ...] = ()


def code_question_for(binding: AccountBinding, after: datetime) -> CodeQuestion:
    """The question of a code waiter; raises :class:`ProviderNotConfigured` for a shared mailbox
    whose provider has no rules (its mail cannot be told apart from the other accounts')."""
    rules = (
        AccountProvider.objects.filter(tenant_id=binding.tenant_id, name=binding.provider)
        .values_list("sender_domains", "subject_patterns")
        .first()
    ) or ([], [])
    question = CodeQuestion(
        binding_id=binding.pk,
        tenant_id=binding.tenant_id,
        mailbox_id=binding.mailbox_id,
        provider=binding.provider,
        after=after,
        sender_domains=tuple(rules[0]),
        subject_patterns=tuple(rules[1]),
    )
    if provider_filter(question.sender_domains, question.subject_patterns) is None and (
        AccountBinding.objects.filter(mailbox_id=binding.mailbox_id, active=True).exclude(pk=binding.pk).exists()
    ):
        raise ProviderNotConfigured(binding.provider)
    return question


# A waiter's safety re-check (every few seconds, mailboxes.waiting) asks first whether its
# mailbox has had any mail indexed lately: one query a second for all the binding waiters of
# a tenant in this process, instead of one per waiter (500 waiters on 500 bindings re-checking
# every 5 s kept the waiters' database pool busy). The window is far longer than the re-check
# period, so a message whose notification was lost is still found by a later re-check.
RECENT_WINDOW = 60.0  # seconds
RECENT_REUSE = 1.0  # seconds one answer serves
_recent: dict[UUID, tuple[float, frozenset[UUID]]] = {}
_recent_lock = threading.Lock()


def mailboxes_indexed_recently(tenant_id: UUID) -> frozenset[UUID]:
    """Mailboxes of the tenant with mail indexed in the last RECENT_WINDOW seconds."""
    now = time.monotonic()
    with _recent_lock:
        cached = _recent.get(tenant_id)
    if cached is not None and now - cached[0] < RECENT_REUSE:
        return cached[1]
    since = timezone.now() - timedelta(seconds=RECENT_WINDOW)
    found = frozenset(
        Message.objects.filter(state=Message.State.INDEXED, state_changed_at__gt=since, tenant_id=tenant_id)
        .filter(mailbox__isnull=False)
        .values_list("mailbox_id", flat=True)
        .distinct()
    )
    with _recent_lock:
        _recent[tenant_id] = (now, found)
    return found


def binding_code_newest(question: CodeQuestion, message_id: UUID | None = None) -> tuple[UUID, datetime] | None:
    """(id, received_at) of the newest indexed message with a code for this binding, or None.

    Only mail of the binding's mailbox received after ``after`` (never before the binding
    existed), only while the binding is active, and only mail its provider's rules attribute
    to it; a provider without rules gets its mailbox's mail only while no other account is
    bound to that mailbox. One query.
    """
    queryset = (
        Message.objects.filter(
            mailbox_id=question.mailbox_id,
            tenant_id=question.tenant_id,
            state=Message.State.INDEXED,
            deleted_at__isnull=True,
            received_at__gt=question.after,
        )
        .exclude(codes=[])
        .filter(Exists(AccountBinding.objects.filter(pk=question.binding_id, active=True)))
        .order_by("-received_at", "-id")
    )
    condition = provider_filter(question.sender_domains, question.subject_patterns)
    if condition is not None:
        queryset = queryset.filter(condition)
    else:
        others = AccountBinding.objects.filter(mailbox_id=question.mailbox_id, active=True).exclude(
            pk=question.binding_id
        )
        queryset = queryset.exclude(Exists(others))
    if message_id is not None:
        queryset = queryset.filter(pk=message_id)
    row = queryset.values_list("pk", "received_at").first()
    return (row[0], row[1]) if row is not None else None


# --- Metrics ------------------------------------------------------------------------------
_SERVED_BUCKET = 3600


def codes_served_count(pool_id: UUID) -> None:
    """Count one code answered through a binding of this pool (hourly buckets in the cache)."""
    now = time.time()
    bucket = int(now) // _SERVED_BUCKET
    key = f"pool-codes:{pool_id}:{bucket}"
    # Kept until 25 hours after the bucket's start, on every change (ratelimit.count_add).
    lifetime = math.ceil((bucket + 25) * _SERVED_BUCKET - now)
    cache.add(key, 0, timeout=lifetime)
    if count_add(key, 1, timeout=lifetime) is None:
        cache.set(key, 1, timeout=lifetime)


def codes_served_last_day(pool_id: UUID) -> int:
    now = int(time.time()) // _SERVED_BUCKET
    names = [f"pool-codes:{pool_id}:{bucket}" for bucket in range(now - 23, now + 1)]
    return sum(int(value or 0) for value in cache.get_many(names).values())


def pool_metrics(pool: MailboxPool) -> dict[str, Any]:
    """Live figures of one pool: mailboxes, bound and free, the distribution of bindings per
    mailbox, accounts per provider, codes served and messages received in the last 24 hours."""
    capacity = pool.capacity_per_mailbox
    distribution = dict(
        PoolMailbox.objects.filter(pool=pool)
        .values_list("active_bindings")
        .annotate(mailboxes=Count("id"))
        .order_by("active_bindings")
    )
    mailboxes = sum(distribution.values())
    bound = sum(count for load, count in distribution.items() if load > 0)
    accounts = sum(load * count for load, count in distribution.items())
    providers = Counter(
        dict(
            AccountBinding.objects.filter(pool=pool, active=True)
            .values_list("provider")
            .annotate(accounts=Count("id"))
            .order_by()
        )
    )
    since = timezone.now() - timedelta(hours=24)
    received = Message.objects.filter(
        mailbox__pool_member__pool=pool, received_at__gte=since, deleted_at__isnull=True
    ).count()
    return {
        "mailboxes": mailboxes,
        "bound_mailboxes": bound,
        "free_mailboxes": sum(count for load, count in distribution.items() if load < capacity),
        "accounts": accounts,
        "free_places": max(0, mailboxes * capacity - accounts),
        "bindings_per_mailbox": {str(load): count for load, count in distribution.items()},
        "accounts_per_provider": dict(sorted(providers.items())),
        "codes_served_24h": codes_served_last_day(pool.pk),
        "messages_received_24h": received,
    }


def mailbox_in_pool(principal: Principal, mailbox_id: UUID) -> Mailbox | None:
    """A mailbox a reassignment may target: a member of a pool the principal sees."""
    return (
        Mailbox.objects.filter(pk=mailbox_id, pool_member__pool__in=pool_list(principal))
        .select_related("domain")
        .first()
    )
