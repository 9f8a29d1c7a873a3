"""The one choke point that decides who may see and change what.

A :class:`Principal` is either a member of a tenant (with a role) or an API key (with a
list of permissions and a resource allow-list). Every selector narrows its queryset with
:meth:`Principal.scope` (or :meth:`Principal.scope_domains`), and every DRF permission asks
:meth:`Principal.has_perm`. An object outside the scope is simply not in the queryset, so it
answers 404 exactly like a missing one: existence never leaks across tenants.
"""

from __future__ import annotations

import enum
import ipaddress
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from django.core.exceptions import PermissionDenied
from django.db.models import F, Model, Q, QuerySet

from audit.services import Actor

if TYPE_CHECKING:
    from tenants.models import ApiKey, Membership, Tenant, User

M = TypeVar("M", bound=Model)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    """Parsed CIDRs (a bare address is a /32 or /128). Raises ValueError on a bad entry."""
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs)


def ip_in(address: str | None, allowed: Sequence[Network]) -> bool:
    if address is None:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:192.0.2.1 is 192.0.2.1 behind a dual-stack socket
    return any(ip.version == network.version and ip in network for network in allowed)


class Permission(enum.StrEnum):
    MESSAGES_READ = "messages:read"
    MESSAGES_WRITE = "messages:write"
    MAILBOXES_MANAGE = "mailboxes:manage"
    DOMAINS_MANAGE = "domains:manage"
    WEBHOOKS_MANAGE = "webhooks:manage"
    EVENTS_READ = "events:read"
    KEYS_MANAGE = "keys:manage"
    TENANT_MANAGE = "tenant:manage"
    AUDIT_READ = "audit:read"
    MESSAGES_SEND = "messages:send"
    CONNECTORS_MANAGE = "connectors:manage"
    BINDINGS_MANAGE = "bindings:manage"
    CODES_READ = "codes:read"


ALL_PERMISSIONS = frozenset(Permission)

# Permissions that act on the tenant as a whole; a key limited to some domains or mailboxes
# cannot hold them, or it could widen its own reach.
TENANT_WIDE_PERMISSIONS = frozenset({Permission.KEYS_MANAGE, Permission.TENANT_MANAGE, Permission.AUDIT_READ})

ROLE_PERMISSIONS: dict[str, frozenset[Permission]] = {
    "owner": ALL_PERMISSIONS,
    "admin": ALL_PERMISSIONS,
    "member": frozenset(
        {
            Permission.MESSAGES_READ,
            Permission.MESSAGES_WRITE,
            Permission.MAILBOXES_MANAGE,
            Permission.EVENTS_READ,
        }
    ),
    "viewer": frozenset({Permission.MESSAGES_READ, Permission.EVENTS_READ}),
}


@dataclass(frozen=True)
class Principal:
    """Who is asking, within which tenant, allowed to do what, on which resources."""

    tenant: Tenant
    permissions: frozenset[str]
    actor: Actor
    user: User | None = None
    role: str | None = None
    api_key: ApiKey | None = None
    # None: the whole tenant. Otherwise the explicit grants of a scoped key.
    granted_domain_ids: frozenset[UUID] | None = None
    granted_mailbox_ids: frozenset[UUID] | None = None
    # Mailbox pools (mailboxes.MailboxPool): their bindings and codes, not their mailboxes' mail.
    granted_pool_ids: frozenset[UUID] | None = None
    # Domains a mailbox grant makes visible (read-only): the mailbox's own domain.
    mailbox_domain_ids: frozenset[UUID] = field(default_factory=frozenset)
    # Every list must admit the client's address (the tenant's, then the key's own).
    ip_allowlists: tuple[tuple[Network, ...], ...] = ()

    # DRF treats the authenticated "user" object through these two attributes.
    is_authenticated = True

    @property
    def pk(self) -> Any:
        return self.api_key.pk if self.api_key is not None else (self.user.pk if self.user else None)

    @property
    def tenant_id(self) -> UUID:
        return self.tenant.pk

    @classmethod
    def for_member(cls, membership: Membership) -> Principal:
        return cls(
            tenant=membership.tenant,
            permissions=frozenset(ROLE_PERMISSIONS[membership.role]),
            actor=Actor(type="user", label=membership.user.email, user_id=membership.user_id),
            user=membership.user,
            role=membership.role,
            ip_allowlists=_allowlists(membership.tenant.ip_allowlist),
        )

    @classmethod
    def for_api_key(cls, api_key: ApiKey) -> Principal:
        domain_ids, mailbox_rows, pool_ids = _grants(api_key)
        # A key minted with an allow-list stays scoped when every resource on it is gone.
        scoped = api_key.scoped or bool(domain_ids or mailbox_rows or pool_ids)
        # A minted key is never wider than the keys above it, whatever happened since.
        chain = api_key.ancestors()
        permissions = frozenset(api_key.permissions).intersection(*(key.permissions for key in chain))
        return cls(
            tenant=api_key.tenant,
            permissions=permissions,
            actor=Actor(type="api_key", label=f"{api_key.name} (mp_…{api_key.last_four})", api_key_id=api_key.pk),
            api_key=api_key,
            granted_domain_ids=domain_ids if scoped else None,
            granted_mailbox_ids=frozenset(row[0] for row in mailbox_rows) if scoped else None,
            granted_pool_ids=pool_ids if scoped else None,
            mailbox_domain_ids=frozenset(row[1] for row in mailbox_rows),
            ip_allowlists=_allowlists(
                api_key.tenant.ip_allowlist, api_key.ip_allowlist, *(key.ip_allowlist for key in chain)
            ),
        )

    @classmethod
    def system(cls, tenant: Tenant, label: str = "system") -> Principal:
        """Full access for the platform's own jobs and management commands."""
        return cls(tenant=tenant, permissions=frozenset(ALL_PERMISSIONS), actor=Actor.system(label))

    # --- permissions ---------------------------------------------------------------
    @property
    def is_tenant_wide(self) -> bool:
        return self.granted_domain_ids is None

    def has_perm(self, permission: str) -> bool:
        return permission in self.permissions

    def allows_ip(self, address: str | None) -> bool:
        """Whether the control plane may be used from ``address`` (IP allowlists)."""
        return all(ip_in(address, allowed) for allowed in self.ip_allowlists)

    def can_grant(self, permissions: Iterable[str]) -> bool:
        """A principal may hand out only permissions it holds itself."""
        return set(permissions) <= set(self.permissions)

    # --- scoping -------------------------------------------------------------------
    def scope(
        self,
        queryset: QuerySet[M],
        *,
        tenant_field: str = "tenant",
        domain_field: str | None = None,
        mailbox_field: str | None = None,
        pool_field: str | None = None,
    ) -> QuerySet[M]:
        """Narrow ``queryset`` to what this principal may see.

        ``domain_field``, ``mailbox_field`` and ``pool_field`` are the lookups from the model to
        its domain, mailbox and mailbox pool (``"domain"``, ``"mailbox"``, ``"pool"``, ``"pk"``...).
        A scoped key sees rows whose domain, mailbox or pool it was granted; rows with none of
        these lookups (tenant-wide things) are invisible to it.
        """
        queryset = queryset.filter(**{tenant_field: self.tenant.pk})
        if self.is_tenant_wide:
            return queryset
        allowed = Q(pk__in=[])
        if domain_field is not None and self.granted_domain_ids:
            allowed |= Q(**{f"{domain_field}__in": self.granted_domain_ids})
        if mailbox_field is not None and self.granted_mailbox_ids:
            allowed |= Q(**{f"{mailbox_field}__in": self.granted_mailbox_ids})
        if pool_field is not None and self.granted_pool_ids:
            allowed |= Q(**{f"{pool_field}__in": self.granted_pool_ids})
        return queryset.filter(allowed)

    def scope_domains(self, queryset: QuerySet[M], *, writable: bool = False) -> QuerySet[M]:
        """Domains visible to this principal; with ``writable`` only the ones it may change.

        A key granted a mailbox may see that mailbox's domain but never change it.
        """
        queryset = queryset.filter(tenant=self.tenant.pk)
        if self.is_tenant_wide:
            return queryset
        visible = set(self.granted_domain_ids or ())
        if not writable:
            visible |= self.mailbox_domain_ids
        return queryset.filter(pk__in=visible)

    def may_use_domain(self, domain_id: UUID) -> bool:
        """Whether new things (mailboxes) may be created under this domain."""
        return self.is_tenant_wide or domain_id in (self.granted_domain_ids or ())

    def may_manage_domain(self, domain_id: UUID) -> bool:
        """Whether domain-wide settings (the recipient policy, which mailbox is the catch-all)
        may be changed: ``domains:manage`` with the domain itself in scope, never a grant of
        one of its mailboxes."""
        return self.has_perm(Permission.DOMAINS_MANAGE) and self.may_use_domain(domain_id)


class TenantSuspended(PermissionDenied):
    """The tenant is suspended: every door refuses it alike, with 403 and this message (the
    API with the error code ``tenant_suspended``; the web pages with templates/403.html)."""

    code = "tenant_suspended"

    def __init__(self) -> None:
        # The staff's reason (Tenant.status_reason) stays in the admin.
        super().__init__("This tenant is suspended. Its owners can ask support to reactivate it.")


def tenant_ensure_active(tenant: Tenant) -> None:
    """The rule for a suspended tenant, one for every door: the API (DRF permission), the
    console, the inbox, signed downloads and temporary inboxes. Raises :class:`TenantSuspended`."""
    if not tenant.is_active:
        raise TenantSuspended


class IpNotAllowed(PermissionDenied):
    """The request's address is outside an IP allowlist of the tenant (or of the key)."""

    code = "ip_not_allowed"

    def __init__(self, principal: Principal, ip: str | None) -> None:
        if principal.api_key is not None:
            super().__init__("This API key may not be used from your address (IP allowlist).")
        else:
            super().__init__(f"The tenant's IP allowlist blocks your address ({ip or 'unknown'}).")


def principal_ensure_usable(principal: Principal, ip: str | None) -> None:
    """The rules every door applies before any permission: the tenant is active, then the
    request's address is inside every IP allowlist that applies. Raises :class:`TenantSuspended`
    or :class:`IpNotAllowed` (both a 403 with their ``code``)."""
    tenant_ensure_active(principal.tenant)
    if not principal.allows_ip(ip):
        raise IpNotAllowed(principal, ip)


Grants = tuple[frozenset[UUID], list[tuple[UUID, UUID]], frozenset[UUID]]
# A key's allow-list is written once, in the transaction that mints it, and only shrinks
# afterwards (a granted resource deleted deletes its row): each process keeps the answer a
# minute, so most requests ask the database for the key alone. A deleted resource's id in a
# kept answer names nothing; the minute bounds how long its domain stays visible to the key.
GRANTS_TTL = 60.0
_GRANTS_KEPT = 10_000
_grants_kept: dict[UUID, tuple[float, Grants]] = {}


def _grants(api_key: ApiKey) -> Grants:
    """The key's resource allow-list: domain ids, (mailbox id, its domain id) and pool ids, in
    one query (every API request needs it), kept for GRANTS_TTL seconds."""
    now = time.monotonic()
    kept = _grants_kept.get(api_key.pk)
    if kept is not None and now - kept[0] < GRANTS_TTL:
        return kept[1]
    grants = _grants_query(api_key)
    if len(_grants_kept) >= _GRANTS_KEPT:
        _grants_kept.clear()
    _grants_kept[api_key.pk] = (now, grants)
    return grants


def grants_forget(api_key_id: Any = None) -> None:
    """Drop what this process keeps of one key's allow-list (all keys' without an id)."""
    if api_key_id is None:
        _grants_kept.clear()
    else:
        _grants_kept.pop(api_key_id, None)


def _grants_query(api_key: ApiKey) -> Grants:
    from django.db.models import CharField, UUIDField, Value

    def rows(through: Any, kind: str, column: str, domain: Any) -> QuerySet[Any]:
        return (
            through.objects.filter(apikey_id=api_key.pk)
            .annotate(grant_kind=Value(kind, output_field=CharField()), grant_domain=domain)
            .values_list("grant_kind", column, "grant_domain")
        )

    none = Value(None, output_field=UUIDField())
    grants = list(
        rows(type(api_key).allowed_domains.through, "d", "domain_id", none).union(
            rows(type(api_key).allowed_mailboxes.through, "m", "mailbox_id", F("mailbox__domain_id")),
            rows(type(api_key).allowed_pools.through, "p", "mailboxpool_id", none),
            all=True,
        )
    )
    return (
        frozenset(row[1] for row in grants if row[0] == "d"),
        [(row[1], row[2]) for row in grants if row[0] == "m"],
        frozenset(row[1] for row in grants if row[0] == "p"),
    )


def _allowlists(*lists: Sequence[str]) -> tuple[tuple[Network, ...], ...]:
    # Stored lists were validated when saved; an unreadable entry is skipped, never widening.
    parsed = []
    for cidrs in lists:
        if cidrs:
            valid = []
            for cidr in cidrs:
                try:
                    valid.append(ipaddress.ip_network(cidr, strict=False))
                except ValueError:
                    continue
            parsed.append(tuple(valid))
    return tuple(parsed)


# --- Sessions limited to one tenant ---------------------------------------------------------
# A session opened by tenant A's own SSO is vouched for by tenant A's provider alone, so it
# reaches tenant A and nothing else, whatever other memberships the person has: another
# tenant needs its own sign-in (a magic link, or that tenant's SSO).
SESSION_TENANT_SCOPE_KEY = "_mp_tenant_scope"


def session_scope_limit(session: Any, tenant_id: UUID) -> None:
    """Limit this session to one tenant (after a sign-in through that tenant's SSO)."""
    session[SESSION_TENANT_SCOPE_KEY] = str(tenant_id)


def session_scope_clear(session: Any) -> None:
    """A sign-in that proves the person (a magic link) opens a session for all their tenants."""
    session.pop(SESSION_TENANT_SCOPE_KEY, None)


def session_reaches(session: Any, tenant_id: UUID) -> bool:
    """Whether a signed-in session may act in this tenant at all."""
    scope = session.get(SESSION_TENANT_SCOPE_KEY)
    return scope is None or str(scope) == str(tenant_id)


def session_is_limited(session: Any) -> bool:
    """Whether the session was opened by one tenant's SSO (and so vouches for nobody's staff rights)."""
    return session.get(SESSION_TENANT_SCOPE_KEY) is not None


def session_memberships(session: Any, memberships: QuerySet[M]) -> QuerySet[M]:
    """The memberships a session may use: all of them, or the one tenant it is limited to."""
    scope = session.get(SESSION_TENANT_SCOPE_KEY)
    return memberships if scope is None else memberships.filter(tenant_id=scope)
