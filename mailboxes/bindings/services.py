"""Writes for mailbox pools and account bindings.

Allocation is the part that must hold under concurrency, on PostgreSQL and SQLite alike:

- **One active binding per account**: a transaction-level advisory lock on the account
  (PostgreSQL) makes concurrent calls for the same account queue, so the first allocates and
  the rest find its binding; the partial unique index ``binding_one_active_per_account`` is
  the guarantee underneath (a violation re-reads the winner's binding).
- **The pool's policy**: the pool member row (``PoolMailbox``, which carries the mailbox's
  count of active bindings) is locked with ``SELECT ... FOR UPDATE SKIP LOCKED`` before its
  count goes up, so two allocations never both take a mailbox's last place (PostgreSQL
  re-checks the count on the newest row version when it locks it). The binding goes in with
  ``ON CONFLICT DO NOTHING`` and the count rises only if the row is there: what was committed
  while we waited (an account of the same provider on that mailbox, index
  ``binding_one_provider_per_mailbox``; the account itself, elsewhere) is refused by the
  database, and the allocation takes another mailbox or answers the winner's binding. No
  re-read on the common path: one locking SELECT, one INSERT, one UPDATE.
- **Provisioning stays within ``max_mailboxes``**: it runs with the pool row locked and
  counts the members under that lock. The lock is ``FOR NO KEY UPDATE``: it does not block
  the key-share lock every binding insert takes on its pool (foreign key), so allocations go
  on while a pool is provisioned, and an allocation holding a member row never waits for a
  provisioner that waits for that member (the deadlock ``FOR UPDATE`` made possible).

SQLite has no row locks, but its write transactions are serialized (``transaction_mode``
IMMEDIATE in settings), which gives the same guarantees without them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.core.cache import cache
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, OperationalError, connection, transaction
from django.db.models import Exists, F, OuterRef, QuerySet, Sum
from django.utils import timezone

from audit.services import EventSpec, audit_entry_record, event_record, events_record
from mailboxes.bindings import selectors
from mailboxes.bindings.attribution import (
    provider_name_normalize,
    sender_domains_normalize,
    subject_patterns_normalize,
)
from mailboxes.models import AccountBinding, AccountProvider, Mailbox, MailboxPool, PoolMailbox
from mailboxes.services import random_local_part
from tenants import keys
from tenants.access import Permission, Principal
from tenants.models import Domain
from tenants.services import require

logger = logging.getLogger(__name__)

MAX_POOL_SIZE = 100_000
ALLOCATION_ATTEMPTS = 20
EXHAUSTED_EVENT_EVERY = 60  # seconds: a pool that stays full says so once a minute, not per call


class BindingConflict(Exception):
    """A write that the current state refuses (answered 409 with ``code``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class LinkOrCreate:
    binding: AccountBinding
    created: bool
    link: str | None  # the secret link, only when the binding was created


# --- Providers --------------------------------------------------------------------------------
def provider_save(
    *,
    principal: Principal,
    name: str,
    sender_domains: list[str] | None = None,
    subject_patterns: list[str] | None = None,
) -> AccountProvider:
    """Create or change a provider's attribution rules (tenant-wide settings)."""
    require(principal, Permission.BINDINGS_MANAGE)
    if not principal.is_tenant_wide:
        raise PermissionDenied("Providers are tenant-wide settings: they need a key for the whole tenant.")
    name = provider_name_normalize(name)
    with transaction.atomic():
        provider = AccountProvider.objects.select_for_update().filter(tenant=principal.tenant, name=name).first()
        before = _provider_summary(provider) if provider is not None else None
        if provider is None:
            provider = AccountProvider(tenant=principal.tenant, name=name)
        if sender_domains is not None:
            provider.sender_domains = sender_domains_normalize(sender_domains)
        if subject_patterns is not None:
            provider.subject_patterns = subject_patterns_normalize(subject_patterns)
        provider.full_clean(validate_constraints=False, validate_unique=False)
        provider.save()
        audit_entry_record(
            tenant_id=principal.tenant.pk,
            actor=principal.actor,
            action="provider.create" if before is None else "provider.update",
            resource_type="account_provider",
            resource_id=provider.pk,
            before=before,
            after=_provider_summary(provider),
        )
    return provider


def provider_delete(*, principal: Principal, provider: AccountProvider) -> None:
    require(principal, Permission.BINDINGS_MANAGE)
    if not principal.is_tenant_wide:
        raise PermissionDenied("Providers are tenant-wide settings: they need a key for the whole tenant.")
    with transaction.atomic():
        audit_entry_record(
            tenant_id=principal.tenant.pk,
            actor=principal.actor,
            action="provider.delete",
            resource_type="account_provider",
            resource_id=provider.pk,
            before=_provider_summary(provider),
        )
        provider.delete()


def _provider_summary(provider: AccountProvider) -> dict[str, Any]:
    return {
        "name": provider.name,
        "sender_domains": list(provider.sender_domains),
        "subject_patterns": list(provider.subject_patterns),
    }


# --- Pools ------------------------------------------------------------------------------------
_POOL_FIELDS = (
    "name",
    "policy",
    "max_bindings_per_mailbox",
    "one_per_provider",
    "auto_provision",
    "provision_threshold",
    "provision_batch",
    "max_mailboxes",
)


def _pool_summary(pool: MailboxPool) -> dict[str, Any]:
    return {name: getattr(pool, name) for name in _POOL_FIELDS} | {"domain": pool.domain_id}


def _pool_validate(pool: MailboxPool) -> None:
    if pool.max_mailboxes > MAX_POOL_SIZE:
        raise ValidationError({"max_mailboxes": f"At most {MAX_POOL_SIZE}."})
    if pool.max_bindings_per_mailbox < 1:
        raise ValidationError({"max_bindings_per_mailbox": "At least 1."})
    pool.full_clean(validate_unique=False, validate_constraints=False)


def pool_create(
    *,
    principal: Principal,
    domain: Domain,
    name: str,
    mailboxes: list[Mailbox] | None = None,
    size: int = 0,
    **settings: Any,
) -> MailboxPool:
    """A pool on one of the principal's domains, with existing mailboxes of that domain and/or
    ``size`` new mailboxes with random local parts."""
    require(principal, Permission.BINDINGS_MANAGE)
    require(principal, Permission.MAILBOXES_MANAGE)
    if domain.tenant_id != principal.tenant.pk or not principal.may_use_domain(domain.pk):
        raise PermissionDenied("This key cannot create pools on that domain.")
    unknown = set(settings) - set(_POOL_FIELDS)
    if unknown:
        raise ValidationError({field: "This field cannot be set." for field in sorted(unknown)})
    pool = MailboxPool(tenant=principal.tenant, domain=domain, name=name.strip(), **settings)
    _pool_validate(pool)
    mailboxes = list(mailboxes or [])
    if any(mailbox.domain_id != domain.pk for mailbox in mailboxes):
        raise ValidationError({"mailboxes": "Every mailbox must be on the pool's domain."})
    if len(mailboxes) + size > pool.max_mailboxes:
        raise ValidationError({"size": f"The pool holds at most {pool.max_mailboxes} mailboxes (max_mailboxes)."})
    try:
        with transaction.atomic():
            pool.save(force_insert=True)
            PoolMailbox.objects.bulk_create([PoolMailbox(pool=pool, mailbox=mailbox) for mailbox in mailboxes])
            audit_entry_record(
                tenant_id=pool.tenant_id,
                actor=principal.actor,
                action="pool.create",
                resource_type="mailbox_pool",
                resource_id=pool.pk,
                after={**_pool_summary(pool), "mailboxes": [str(m.pk) for m in mailboxes], "size": size},
            )
            if size:
                _provision(pool, size, reason="created")
    except IntegrityError:
        if MailboxPool.objects.filter(tenant=principal.tenant, name=pool.name).exists():
            raise ValidationError({"name": "A pool with this name exists."}, code="unique") from None
        raise ValidationError({"mailboxes": "A mailbox is in another pool already."}, code="unique") from None
    return pool


def pool_update(*, principal: Principal, pool: MailboxPool, **changes: Any) -> MailboxPool:
    require(principal, Permission.BINDINGS_MANAGE)
    before = _pool_summary(pool)
    for field, value in changes.items():
        if field not in _POOL_FIELDS:
            raise ValidationError({field: "This field cannot be changed."})
        setattr(pool, field, value)
    _pool_validate(pool)
    try:
        with transaction.atomic():
            pool.save(update_fields=[*changes, "updated_at"])
            audit_entry_record(
                tenant_id=pool.tenant_id,
                actor=principal.actor,
                action="pool.update",
                resource_type="mailbox_pool",
                resource_id=pool.pk,
                before=before,
                after=_pool_summary(pool),
            )
    except IntegrityError:
        raise ValidationError({"name": "A pool with this name exists."}, code="unique") from None
    return pool


def _provision(pool: MailboxPool, wanted: int, *, reason: str) -> list[PoolMailbox]:
    """Add up to ``wanted`` mailboxes with random local parts, never past ``max_mailboxes``.

    Call inside a transaction: the pool row stays locked until it commits, so concurrent
    provisioning counts the members one after the other.
    """
    MailboxPool.objects.select_for_update(no_key=True).filter(pk=pool.pk).values_list("pk", flat=True).first()
    room = pool.max_mailboxes - PoolMailbox.objects.filter(pool_id=pool.pk).count()
    count = min(wanted, room)
    if count <= 0:
        return []
    domain = pool.domain
    mailboxes = []
    for _ in range(count):
        local = random_local_part()
        mailboxes.append(
            Mailbox(
                tenant_id=pool.tenant_id,
                domain_id=domain.pk,
                local_part=local,
                address=f"{local}@{domain.name}",
                name=f"pool {pool.name}",
            )
        )
    Mailbox.objects.bulk_create(mailboxes)
    members = PoolMailbox.objects.bulk_create([PoolMailbox(pool_id=pool.pk, mailbox=mailbox) for mailbox in mailboxes])
    specs = [
        EventSpec(
            pool.tenant_id,
            "mailbox.created",
            {"address": mailbox.address, "kind": mailbox.kind, "pool": str(pool.pk)},
            domain_id=domain.pk,
            mailbox_id=mailbox.pk,
        )
        for mailbox in mailboxes
    ]
    specs.append(
        EventSpec(
            pool.tenant_id,
            "pool.provisioned",
            {"pool": str(pool.pk), "mailboxes": count, "reason": reason},
            domain_id=domain.pk,
        )
    )
    events_record(specs)
    logger.info("pool %s provisioned %d mailboxes (%s)", pool.pk, count, reason)
    return members


def pool_free_places(pool: MailboxPool) -> int:
    """How many more accounts the pool's mailboxes can take (ignoring providers)."""
    members = PoolMailbox.objects.filter(pool_id=pool.pk)
    total = members.count() * pool.capacity_per_mailbox
    bound = members.aggregate(total=Sum("active_bindings"))["total"] or 0
    return max(0, total - bound)


def pool_has_free_places(pool: MailboxPool, wanted: int) -> bool:
    """Whether the pool's mailboxes can take ``wanted`` more accounts (ignoring providers).

    Reads at most ``wanted`` members, the least bound first (index ``pool_member_load``), not
    the whole pool: each member with room has at least one free place, so ``wanted`` of them
    answer yes, and fewer are all there is.
    """
    if wanted <= 0:
        return True
    capacity = pool.capacity_per_mailbox
    loads = (
        PoolMailbox.objects.filter(pool_id=pool.pk, active_bindings__lt=capacity)
        .order_by("active_bindings", "id")
        .values_list("active_bindings", flat=True)[:wanted]
    )
    return sum(capacity - load for load in loads) >= wanted


def pool_provision_if_low(pool: MailboxPool) -> int:
    """Top the pool up by a batch when its free places are below the threshold (auto-provisioning).

    Returns the number of mailboxes added. A provisioning already running elsewhere is not
    waited for (its pool row is locked: skipped). One bounded query when the pool has room.
    """
    if not pool.auto_provision or pool_has_free_places(pool, pool.provision_threshold):
        return 0
    with transaction.atomic():
        locked = (
            MailboxPool.objects.select_for_update(skip_locked=True, no_key=True)
            .select_related("domain")
            .filter(pk=pool.pk)
            .first()
        )
        if locked is None or pool_has_free_places(locked, locked.provision_threshold):
            return 0
        return len(_provision(locked, max(1, locked.provision_batch), reason="below threshold"))


# --- Allocation -------------------------------------------------------------------------------
def _candidates(pool: MailboxPool, provider: str, excluded: set[int]) -> QuerySet[PoolMailbox]:
    members = PoolMailbox.objects.select_related("mailbox").filter(
        pool_id=pool.pk, active_bindings__lt=pool.capacity_per_mailbox
    )
    if excluded:
        members = members.exclude(pk__in=excluded)
    if pool.one_per_provider:
        same_provider = AccountBinding.objects.filter(mailbox_id=OuterRef("mailbox_id"), provider=provider, active=True)
        members = members.exclude(Exists(same_provider))
    if pool.policy == MailboxPool.Policy.SHARED:
        return members.order_by("-active_bindings", "id")  # pack: the fullest mailbox with room
    return members.order_by("active_bindings", "id")  # spread: the least bound first


def _still_fits(pool: MailboxPool, member: PoolMailbox, provider: str) -> bool:
    """Re-read under the row lock (one query): what was committed while we waited is visible now."""
    same_provider = AccountBinding.objects.filter(mailbox_id=OuterRef("mailbox_id"), provider=provider, active=True)
    row = (
        PoolMailbox.objects.filter(pk=member.pk)
        .annotate(provider_taken=Exists(same_provider))
        .values_list("active_bindings", "provider_taken")
        .first()
    )
    if row is None or row[0] >= pool.capacity_per_mailbox:
        return False
    return not (pool.one_per_provider and row[1])


def _allocate(pool: MailboxPool, provider: str, *, excluded: set[int]) -> PoolMailbox | None:
    """Lock and return the member to bind, by the pool's policy; None when the pool is full
    (after provisioning once, when the pool provisions itself).

    Call inside a transaction; :func:`_bind` inserts the binding and raises the member's count.
    """
    for provisioned in (False, True, True):
        member = None
        candidates = _candidates(pool, provider, excluded)
        if connection.features.has_select_for_update_skip_locked:
            # First a member nobody else is taking; only if every candidate is being taken,
            # wait for one (its count may still have room once the other commits).
            member = candidates.select_for_update(skip_locked=True, of=("self",)).first()
            if member is None:
                member = candidates.select_for_update(of=("self",)).first()
        else:
            member = candidates.first()  # SQLite: this transaction is the only writer
        if member is not None:
            return member
        if provisioned or not pool.auto_provision:
            return None
        # Full: provision (the pool row lock serializes this), then look again; when it added
        # nothing (at its maximum, or another allocation provisioned meanwhile), one more look.
        _provision(pool, max(1, pool.provision_batch), reason="exhausted")
    return None


def _bind(
    pool: MailboxPool,
    *,
    account_ref: str,
    provider: str,
    label: str,
    metadata: dict[str, Any],
    link: tuple[str, str] | None = None,
    exclude_mailbox: UUID | None = None,
) -> tuple[AccountBinding, PoolMailbox, str | None] | None:
    """Allocate a member by the pool's policy and bind the account to it; None when the pool
    has no room. Raises :class:`_AccountTaken` when the account got an active binding meanwhile.

    A member the database refuses (an account of this provider committed on it while we
    waited) is left out and the next one taken.
    """
    excluded: set[int] = set()
    if exclude_mailbox is not None:
        excluded.update(PoolMailbox.objects.filter(mailbox_id=exclude_mailbox).values_list("pk", flat=True))
    elif connection.vendor == "postgresql":
        # The common case in one statement; when it cannot bind (every candidate held by
        # another call, the pool full, the database refusing the member), the steps below.
        new = _binding_new(pool, account_ref=account_ref, provider=provider, label=label, metadata=metadata, link=link)
        tried, bound = _bind_at_once(pool, *new)
        if bound is not None:
            return bound
        if tried is not None:
            if AccountBinding.objects.filter(tenant_id=pool.tenant_id, account_ref=account_ref, active=True).exists():
                raise _AccountTaken
            excluded.add(tried)
    for _ in range(ALLOCATION_ATTEMPTS):
        member = _allocate(pool, provider, excluded=excluded)
        if member is None:
            return None
        inserted = _binding_insert(
            pool=pool,
            member=member,
            account_ref=account_ref,
            provider=provider,
            label=label,
            metadata=metadata,
            link=link,
        )
        if inserted is not None:
            return inserted[0], member, inserted[1]
        if AccountBinding.objects.filter(tenant_id=pool.tenant_id, account_ref=account_ref, active=True).exists():
            raise _AccountTaken
        excluded.add(member.pk)
    return None


def _account_lock(tenant_id: UUID, account_ref: str) -> None:
    """Queue concurrent calls for one account behind each other (PostgreSQL; SQLite serializes
    every write transaction anyway)."""
    if connection.vendor != "postgresql":
        return
    digest = hashlib.blake2b(f"binding:{tenant_id}:{account_ref}".encode(), digest_size=8).digest()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [int.from_bytes(digest, "big", signed=True)])


def _count_change(member_id: int, delta: int) -> None:
    PoolMailbox.objects.filter(pk=member_id).update(active_bindings=F("active_bindings") + delta)


class _NoRoom(Exception):
    pass


class _AccountTaken(Exception):
    """The account's active binding was committed by another call while this one allocated."""


def _pool_exhausted(pool: MailboxPool, provider: str) -> BindingConflict:
    if cache.add(f"pool-exhausted:{pool.pk}", 1, timeout=EXHAUSTED_EVENT_EVERY):
        event_record(
            tenant_id=pool.tenant_id,
            type="pool.exhausted",
            data={"pool": str(pool.pk), "provider": provider},
            domain_id=pool.domain_id,
        )
    return BindingConflict("pool_exhausted", f"No mailbox of pool {pool.name!r} can take another {provider} account.")


def _binding_summary(binding: AccountBinding) -> dict[str, Any]:
    return {
        "account_ref": binding.account_ref,
        "provider": binding.provider,
        "pool": binding.pool_id,
        "mailbox": binding.mailbox_id,
        "label": binding.label,
        "active": binding.active,
    }


def _binding_event_data(binding: AccountBinding, **extra: Any) -> dict[str, Any]:
    return {
        "binding": str(binding.pk),
        "account_ref": binding.account_ref,
        "provider": binding.provider,
        "pool": str(binding.pool_id),
        **extra,
    }


def _active_for_account(tenant_id: UUID, account_ref: str) -> AccountBinding | None:
    return selectors.binding_one(
        AccountBinding.objects.select_related("mailbox", "pool").filter(
            tenant_id=tenant_id, account_ref=account_ref, active=True
        )
    )


def binding_link_or_create(
    *,
    principal: Principal,
    pool: MailboxPool,
    account_ref: str,
    provider: str,
    label: str = "",
    metadata: dict[str, Any] | None = None,
    looked_up: bool = False,
) -> LinkOrCreate:
    """The account's active binding, or a new one on a mailbox allocated by the pool's policy.

    Idempotent: concurrent calls for one account create one binding. Raises
    :class:`BindingConflict` (``account_bound`` when the account is bound for another provider,
    ``pool_exhausted`` when no mailbox can take it). ``looked_up``: the caller has just looked
    for the account's active binding and found none, so the first look is skipped (a binding
    elsewhere is still found: the database refuses a second one).

    A new account is one transaction of seven statements: the account's advisory lock, the
    member row locked, the binding inserted, the member's count raised, the event (with the
    webhooks' endpoint lookup) and the audit entry.
    """
    require(principal, Permission.BINDINGS_MANAGE)
    provider = provider_name_normalize(provider)
    account_ref = account_ref.strip()
    if not account_ref or len(account_ref) > 200:
        raise ValidationError({"account_ref": "1 to 200 characters."})
    tenant_id = principal.tenant.pk
    existing = None if looked_up else _active_for_account(tenant_id, account_ref)
    if existing is None:
        for attempt in range(LOCK_CONFLICT_ATTEMPTS):
            try:
                with transaction.atomic():
                    # Calls for one account queue here; the ones after the first find its
                    # binding when the database refuses theirs (_AccountTaken), not by a re-read
                    # that every new account would pay for.
                    _account_lock(tenant_id, account_ref)
                    bound = _bind(
                        pool, account_ref=account_ref, provider=provider, label=label, metadata=metadata or {}
                    )
                    if bound is None:
                        raise _NoRoom
                    binding, member, link = bound
                    event_record(
                        tenant_id=tenant_id,
                        type="binding.created",
                        data=_binding_event_data(binding, address=member.mailbox.address),
                        domain_id=pool.domain_id,
                        mailbox_id=member.mailbox_id,
                    )
                    audit_entry_record(
                        tenant_id=tenant_id,
                        actor=principal.actor,
                        action="binding.create",
                        resource_type="account_binding",
                        resource_id=binding.pk,
                        after=_binding_summary(binding),
                    )
            except _NoRoom:
                # Full for this account, unless another call bound it meanwhile.
                existing = _active_for_account(tenant_id, account_ref)
                if existing is None:
                    raise _pool_exhausted(pool, provider) from None
            except _AccountTaken:
                existing = _active_for_account(tenant_id, account_ref)
                if existing is None:  # released again at once: take it from the start
                    continue
            except IntegrityError:
                # Another process bound the account between our look and our insert (without the
                # advisory lock: SQLite, or a caller outside this function): its binding wins.
                existing = _active_for_account(tenant_id, account_ref)
                if existing is None:
                    raise
            except OperationalError as error:
                # PostgreSQL broke a deadlock between allocations (one waiting for a member row
                # while holding the pool row to provision, another the other way round) by
                # rolling this one back: take it again from the start, as the server advises.
                if not _is_lock_conflict(error) or attempt + 1 == LOCK_CONFLICT_ATTEMPTS:
                    raise
                if transaction.get_connection().in_atomic_block:
                    raise  # the caller's transaction is lost with ours: only it can start again
                continue
            else:
                if pool.auto_provision:
                    transaction.on_commit(lambda: _provision_after(pool))
                return LinkOrCreate(binding=binding, created=True, link=link)
            break
    if existing is None:
        raise _pool_exhausted(pool, provider)  # bound and released under us three times over
    if existing.provider != provider:
        raise BindingConflict(
            "account_bound", f"This account is bound for provider {existing.provider!r}; release it first."
        )
    return LinkOrCreate(binding=existing, created=False, link=None)


LOCK_CONFLICT_ATTEMPTS = 3


def _is_lock_conflict(error: OperationalError) -> bool:
    """A deadlock or serialization failure (SQLSTATE 40P01, 40001): retrying the transaction is the cure."""
    return getattr(error.__cause__, "sqlstate", None) in {"40P01", "40001"}


def _provision_after(pool: MailboxPool) -> None:
    """Top the pool up once the allocation has committed (never inside its transaction): one
    bounded query when it has room; the settings are read again under the lock before adding."""
    try:
        pool_provision_if_low(pool)
    except Exception:  # the allocation stands; the next one or the console tries again
        logger.exception("pool %s: provisioning after an allocation failed", pool.pk)


def _binding_insert(
    *,
    pool: MailboxPool,
    member: PoolMailbox,
    account_ref: str,
    provider: str,
    label: str,
    metadata: dict[str, Any],
    link: tuple[str, str] | None = None,
) -> tuple[AccountBinding, str | None] | None:
    """Insert an active binding on ``member`` (locked by the caller) and raise its count; None
    when the database refuses it (nothing changed).

    ``link``: the (prefix, hash) of an existing link to carry over (reassignment); otherwise a
    new link is generated and its secret returned.

    Two statements: ``INSERT ... ON CONFLICT DO NOTHING`` (a partial unique index refuses a
    second active binding of the account, or a second account of the provider on a mailbox of
    a ``one_per_provider`` pool), then the count raised only where the binding is there and the
    mailbox has room.
    """
    binding, secret = _binding_new(
        pool, account_ref=account_ref, provider=provider, label=label, metadata=metadata, link=link
    )
    binding.mailbox = member.mailbox
    AccountBinding.objects.bulk_create([binding], ignore_conflicts=True)
    counted = (
        PoolMailbox.objects.filter(pk=member.pk, active_bindings__lt=pool.capacity_per_mailbox)
        .filter(Exists(AccountBinding.objects.filter(pk=binding.pk)))
        .update(active_bindings=F("active_bindings") + 1)
    )
    if not counted:
        AccountBinding.objects.filter(pk=binding.pk).delete()  # inserted on a full mailbox: undone
        return None
    return binding, secret


_BINDING_KEYS = ["tenant", "pool", "mailbox", "successor"]


def _binding_new(
    pool: MailboxPool,
    *,
    account_ref: str,
    provider: str,
    label: str,
    metadata: dict[str, Any],
    link: tuple[str, str] | None,
) -> tuple[AccountBinding, str | None]:
    """An unsaved active binding of the pool, its mailbox not set yet, and its link's secret
    (None when ``link``, the (prefix, hash) of an existing link, is carried over)."""
    secret = None
    if link is None:
        generated = keys.generate(prefix=keys.LINK_PREFIX)
        link, secret = (generated.prefix, generated.secret_hash), generated.secret
    binding = AccountBinding(
        tenant_id=pool.tenant_id,
        pool=pool,
        account_ref=account_ref,
        provider=provider,
        provider_exclusive=pool.one_per_provider,
        label=label,
        metadata=metadata,
        link_prefix=link[0],
        link_hash=link[1],
    )
    # The foreign keys come from rows this transaction holds: not looked up again.
    binding.full_clean(exclude=_BINDING_KEYS, validate_unique=False, validate_constraints=False)
    return binding, secret


_AT_ONCE: dict[tuple[bool, bool], str] = {}


def _bind_at_once(
    pool: MailboxPool, binding: AccountBinding, secret: str | None
) -> tuple[int | None, tuple[AccountBinding, PoolMailbox, str | None] | None]:
    """PostgreSQL: what :func:`_allocate` and :func:`_binding_insert` do for a first member,
    as one statement: lock the member the policy picks (skipping members other calls hold),
    insert the binding on its mailbox (``ON CONFLICT DO NOTHING``: the partial unique indexes
    judge) and raise its count only where the binding went in.

    Returns the member's id (None when no candidate was free to lock) and the binding with
    its member and link's secret (None when nothing was inserted: the caller goes on step by
    step, that member left out). ``binding``: from :func:`_binding_new`, with its link's secret.
    """
    fields = [field for field in AccountBinding._meta.concrete_fields if field.attname != "mailbox_id"]
    values = [field.get_db_prep_save(field.pre_save(binding, True), connection) for field in fields]
    shape = (pool.policy == MailboxPool.Policy.SHARED, pool.one_per_provider)
    sql = _AT_ONCE.get(shape)
    if sql is None:
        sql = _AT_ONCE[shape] = _bind_at_once_sql(fields, shared=shape[0], one_per_provider=shape[1])
    parameters: list[Any] = [pool.pk, pool.capacity_per_mailbox]
    if pool.one_per_provider:
        parameters.append(binding.provider)
    with connection.cursor() as cursor:
        cursor.execute(sql, [*parameters, *values])
        row = cursor.fetchone()
    if row is None:
        return None, None
    member_id, mailbox_id, address, inserted = row
    if not inserted:
        return member_id, None
    member = PoolMailbox.from_db(connection.alias, ["id", "pool_id", "mailbox_id"], [member_id, pool.pk, mailbox_id])
    # The mailbox as far as this statement read it; any other field is loaded when asked for.
    member.mailbox = binding.mailbox = Mailbox.from_db(connection.alias, ["id", "address"], [mailbox_id, address])
    binding._state.adding, binding._state.db = False, connection.alias
    return member_id, (binding, member, secret)


def _bind_at_once_sql(fields: list[Any], *, shared: bool, one_per_provider: bool) -> str:
    binding, member, mailbox = (model._meta.db_table for model in (AccountBinding, PoolMailbox, Mailbox))
    columns = ", ".join(f'"{field.column}"' for field in fields)
    values = ", ".join(f"%s::{field.db_type(connection)}" for field in fields)
    same_provider = (
        f' AND NOT EXISTS (SELECT 1 FROM "{binding}" b WHERE b."mailbox_id" = pm."mailbox_id"'  # noqa: S608
        ' AND b."provider" = %s AND b."active")'
        if one_per_provider
        else ""
    )
    order = 'pm."active_bindings" DESC, pm."id"' if shared else 'pm."active_bindings", pm."id"'
    return (
        f'WITH member AS (SELECT pm."id", pm."mailbox_id" FROM "{member}" pm'  # noqa: S608 (names from the models)
        f' WHERE pm."pool_id" = %s AND pm."active_bindings" < %s{same_provider}'
        f" ORDER BY {order} LIMIT 1 FOR UPDATE OF pm SKIP LOCKED),"
        f' inserted AS (INSERT INTO "{binding}" ({columns}, "mailbox_id") SELECT {values}, member."mailbox_id"'
        ' FROM member ON CONFLICT DO NOTHING RETURNING "id"),'
        f' counted AS (UPDATE "{member}" p SET "active_bindings" = p."active_bindings" + 1'
        ' FROM member, inserted WHERE p."id" = member."id" RETURNING p."id")'
        f' SELECT member."id", member."mailbox_id", m."address", EXISTS (SELECT 1 FROM counted)'
        f' FROM member JOIN "{mailbox}" m ON m."id" = member."mailbox_id"'
    )


def _end(binding: AccountBinding, reason: str) -> None:
    binding.active = False
    binding.released_at = timezone.now()
    binding.ended_reason = reason
    binding.link_prefix = binding.link_hash = ""
    binding.save(update_fields=["active", "released_at", "ended_reason", "link_prefix", "link_hash"])
    member_id = PoolMailbox.objects.filter(mailbox_id=binding.mailbox_id).values_list("pk", flat=True).first()
    if member_id is not None:
        _count_change(member_id, -1)


def _locked_active(binding: AccountBinding) -> AccountBinding:
    locked = AccountBinding.objects.select_for_update().select_related("pool", "mailbox").get(pk=binding.pk)
    if not locked.active:
        raise BindingConflict("binding_inactive", "This binding was released or reassigned.")
    return locked


def binding_release(*, principal: Principal, binding: AccountBinding) -> AccountBinding:
    """End the binding: its link answers 404 from now on, its mailbox has a free place."""
    require(principal, Permission.BINDINGS_MANAGE)
    with transaction.atomic():
        binding = _locked_active(binding)
        before = _binding_summary(binding)
        _end(binding, AccountBinding.EndedReason.RELEASED)
        event_record(
            tenant_id=binding.tenant_id,
            type="binding.released",
            data=_binding_event_data(binding),
            domain_id=binding.pool.domain_id,
            mailbox_id=binding.mailbox_id,
        )
        audit_entry_record(
            tenant_id=binding.tenant_id,
            actor=principal.actor,
            action="binding.release",
            resource_type="account_binding",
            resource_id=binding.pk,
            before=before,
            after=_binding_summary(binding),
        )
    return binding


def binding_reassign(
    *,
    principal: Principal,
    binding: AccountBinding,
    mailbox: Mailbox | None = None,
    pool: MailboxPool | None = None,
) -> AccountBinding:
    """Move the account to ``mailbox`` (a member of a pool), or to a mailbox allocated from
    ``pool`` (default: its own pool, another mailbox). The old binding stays as history; the
    new one keeps the link, and codes count from the new binding's creation."""
    require(principal, Permission.BINDINGS_MANAGE)
    try:
        with transaction.atomic():
            binding = _locked_active(binding)
            chosen: PoolMailbox | None = None
            if mailbox is not None:
                member = (
                    PoolMailbox.objects.select_for_update()
                    .select_related("pool", "mailbox")
                    .filter(mailbox=mailbox)
                    .first()
                )
                if member is None:
                    raise ValidationError({"mailbox": "This mailbox is in no pool."})
                if member.mailbox_id == binding.mailbox_id:
                    raise BindingConflict("same_mailbox", "The account is bound to this mailbox already.")
                target_pool = member.pool
                if not _still_fits(target_pool, member, binding.provider):
                    raise BindingConflict("mailbox_full", "This mailbox cannot take another account of this provider.")
                chosen = member
            link = (binding.link_prefix, binding.link_hash)
            before = _binding_summary(binding)
            _end(binding, AccountBinding.EndedReason.REASSIGNED)
            if chosen is not None:
                inserted = _binding_insert(
                    pool=target_pool,
                    member=chosen,
                    account_ref=binding.account_ref,
                    provider=binding.provider,
                    label=binding.label,
                    metadata=binding.metadata,
                    link=link,
                )
                if inserted is None:
                    raise BindingConflict("mailbox_full", "This mailbox cannot take another account of this provider.")
                successor = inserted[0]
            else:
                target_pool = pool or binding.pool
                bound = _bind(
                    target_pool,
                    account_ref=binding.account_ref,
                    provider=binding.provider,
                    label=binding.label,
                    metadata=binding.metadata,
                    link=link,
                    exclude_mailbox=binding.mailbox_id,
                )
                if bound is None:
                    raise _NoRoom
                successor = bound[0]
            binding.successor = successor
            binding.save(update_fields=["successor"])
            event_record(
                tenant_id=binding.tenant_id,
                type="binding.reassigned",
                data=_binding_event_data(successor, previous=str(binding.pk), from_mailbox=str(binding.mailbox_id)),
                domain_id=target_pool.domain_id,
                mailbox_id=successor.mailbox_id,
            )
            audit_entry_record(
                tenant_id=binding.tenant_id,
                actor=principal.actor,
                action="binding.reassign",
                resource_type="account_binding",
                resource_id=binding.pk,
                before=before,
                after={**_binding_summary(successor), "successor": successor.pk},
            )
    except _NoRoom:
        raise _pool_exhausted(pool or binding.pool, binding.provider) from None
    return AccountBinding.objects.select_related("pool", "mailbox").get(pk=successor.pk)
