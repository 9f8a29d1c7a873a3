"""Writes to the tenant hierarchy. Each checks the principal, validates, saves and audits."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import idna
from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.text import slugify

from audit.context import current as current_context
from audit.services import Actor, audit_entry_record, event_record
from mailplatform.lookups import rows_with_parent
from tenants import keys
from tenants.access import ALL_PERMISSIONS, TENANT_WIDE_PERMISSIONS, Permission, Principal, ip_in, networks
from tenants.models import ApiKey, Domain, Membership, SsoDomain, SsoProvider, Tenant, User

logger = logging.getLogger(__name__)

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def require(principal: Principal, permission: Permission) -> None:
    if not principal.has_perm(permission):
        raise PermissionDenied(f"This action needs the {permission} permission.")


def domain_name_normalize(name: str) -> str:
    """Lowercase A-label form of a domain name, or ValidationError saying what is wrong.

    Unicode input is converted by IDNA 2008 with the UTS #46 mapping (non-transitional, as
    browsers and registries do: ``faß.de`` is ``xn--fa-hia.de``, not ``fass.de``). An ``xn--``
    label must be a valid A-label: its Punycode decodes to a permitted U-label that encodes
    back to the same label (``xn--zz`` does not).
    """
    candidate = name.strip().rstrip(".").lower()
    if not candidate:
        raise ValidationError({"name": "Enter a domain name."})
    if not candidate.isascii():
        try:
            candidate = idna.encode(candidate, uts46=True).decode("ascii")
        except idna.IDNAError as failure:
            raise ValidationError({"name": _IDNA_INVALID.format(name=candidate, reason=failure)}) from None
    labels = candidate.split(".")
    if len(candidate) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise ValidationError({"name": "This is not a valid domain name."})
    for label in labels:
        if label.startswith("xn--"):
            _a_label_check(label)
    if labels[-1].isdigit():
        raise ValidationError({"name": "An IP address is not a domain name."})
    return candidate


_IDNA_INVALID = "{name} is not a valid internationalized domain name (IDNA): {reason}."


def _a_label_check(label: str) -> None:
    """ValidationError unless ``label`` (lowercase ASCII, ``xn--...``) is a valid IDNA 2008 A-label."""
    try:
        valid = idna.alabel(idna.ulabel(label)).decode("ascii") == label
        reason = "its Punycode is not in canonical form"
    except idna.IDNAError as failure:
        valid, reason = False, str(failure)
    except UnicodeError:  # the Punycode itself does not decode
        valid, reason = False, "Invalid A-label"
    if not valid:
        raise ValidationError({"name": _IDNA_INVALID.format(name=label, reason=reason.rstrip("."))})


def _summary(instance: Any, fields: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(instance, name) for name in fields}


# --- Users and tenants -----------------------------------------------------------------
def user_get_or_create(*, email: str, name: str = "") -> User:
    email = User.objects.normalize_email(email.strip()).lower()
    user = User.objects.filter(email__iexact=email).first()
    if user is None:
        user = User.objects.create_user(email=email, name=name)
    return user


def tenant_create(
    *, name: str, actor: Actor, plan: str = Tenant.Plan.DEVELOPER, slug: str | None = None, owner: User | None = None
) -> Tenant:
    """Create a tenant, optionally with its first owner."""
    base = slugify(slug or name)[:50] or "tenant"
    candidate, counter = base, 1
    while Tenant.objects.filter(slug=candidate).exists():
        counter += 1
        candidate = f"{base}-{counter}"
    tenant = Tenant(name=name, slug=candidate, plan=plan)
    tenant.full_clean()
    with transaction.atomic():
        tenant.save()
        if owner is not None:
            Membership.objects.create(user=owner, tenant=tenant, role=Membership.Role.OWNER)
        audit_entry_record(
            tenant_id=tenant.pk,
            actor=actor,
            action="tenant.create",
            resource_type="tenant",
            resource_id=tenant.pk,
            after=_summary(tenant, ["name", "slug", "plan"]),
        )
    return tenant


_TENANT_EDITABLE = ("name", "ip_allowlist", "retention_days", "antivirus_mode")


def ip_allowlist_normalize(cidrs: Iterable[str], *, field: str = "ip_allowlist") -> list[str]:
    """Canonical CIDR strings, or ValidationError naming the entry that is not a network."""
    normalized = []
    for cidr in cidrs:
        try:
            normalized.append(str(networks([cidr])[0]))
        except ValueError:
            raise ValidationError({field: f"{cidr!r} is not an IP address or network."}) from None
    return sorted(set(normalized))


def tenant_update(*, principal: Principal, **changes: Any) -> Tenant:
    """Change the tenant's settings. An IP allowlist that would shut out the caller is refused."""
    require(principal, Permission.TENANT_MANAGE)
    tenant = principal.tenant
    before = _summary(tenant, list(changes))
    for name, value in changes.items():
        if name not in _TENANT_EDITABLE:
            raise ValidationError({name: "This field cannot be changed."})
        if name == "ip_allowlist":
            value = ip_allowlist_normalize(value)
            caller = current_context().ip
            if value and caller is not None and not ip_in(caller, networks(value)):
                raise ValidationError(
                    {
                        "ip_allowlist": ValidationError(
                            f"This list would lock out your own address {caller}.", code="lockout"
                        )
                    }
                )
        setattr(tenant, name, value)
    tenant.full_clean()
    with transaction.atomic():
        tenant.save(update_fields=[*changes, "updated_at"])
        audit_entry_record(
            tenant_id=tenant.pk,
            actor=principal.actor,
            action="tenant.update",
            resource_type="tenant",
            resource_id=tenant.pk,
            before=before,
            after=_summary(tenant, list(changes)),
        )
    return tenant


def tenant_set_status(*, tenant: Tenant, status: str, actor: Actor, reason: str = "") -> Tenant:
    """Suspend or reactivate a tenant (staff). A suspended tenant's mail and API are refused."""
    if status not in Tenant.Status.values:
        raise ValidationError({"status": "Unknown status."})
    before = _summary(tenant, ["status", "status_reason"])
    tenant.status = status
    tenant.status_reason = reason if status == Tenant.Status.SUSPENDED else ""
    with transaction.atomic():
        tenant.save(update_fields=["status", "status_reason", "updated_at"])
        audit_entry_record(
            tenant_id=tenant.pk,
            actor=actor,
            action="tenant.suspend" if status == Tenant.Status.SUSPENDED else "tenant.activate",
            resource_type="tenant",
            resource_id=tenant.pk,
            before=before,
            after=_summary(tenant, ["status", "status_reason"]),
        )
    return tenant


def membership_set(*, tenant: Tenant, user: User, role: str, actor: Actor) -> Membership:
    """Add a member, or change an existing member's role."""
    if role not in Membership.Role.values:
        raise ValidationError({"role": "Unknown role."})
    with transaction.atomic():
        membership, created = Membership.objects.get_or_create(tenant=tenant, user=user, defaults={"role": role})
        if not created and membership.role == role:
            return membership
        before = None if created else {"role": membership.role}
        if not created:
            membership.role = role
            membership.save(update_fields=["role"])
        audit_entry_record(
            tenant_id=tenant.pk,
            actor=actor,
            action="membership.create" if created else "membership.update",
            resource_type="membership",
            resource_id=membership.pk,
            before=before,
            after={"user": user.email, "role": role},
        )
    return membership


# --- Domains ----------------------------------------------------------------------------
_DOMAIN_FIELDS = ("name", "recipient_policy", "dmarc_reject", "antivirus_mode", "state")


def domain_create(*, principal: Principal, name: str, recipient_policy: str = Domain.RecipientPolicy.REJECT) -> Domain:
    """Add a domain to the principal's tenant (pending until verified)."""
    require(principal, Permission.DOMAINS_MANAGE)
    if not principal.is_tenant_wide:
        raise PermissionDenied("A key limited to some domains or mailboxes cannot add domains.")
    domain = Domain(tenant=principal.tenant, name=domain_name_normalize(name), recipient_policy=recipient_policy)
    domain.full_clean(validate_constraints=False)
    if Domain.objects.filter(tenant=principal.tenant, name=domain.name).exists():
        raise ValidationError({"name": ValidationError("This tenant already has this domain.", code="unique")})
    if domain_name_unavailable(domain.name, tenant_id=principal.tenant.pk):
        raise ValidationError({"name": ValidationError(_UNAVAILABLE, code="domain_unavailable")})
    try:
        with transaction.atomic():
            domain.save(force_insert=True)
            audit_entry_record(
                tenant_id=principal.tenant.pk,
                actor=principal.actor,
                action="domain.create",
                resource_type="domain",
                resource_id=domain.pk,
                after=_summary(domain, _DOMAIN_FIELDS),
            )
    except IntegrityError:  # the same tenant adding the same name twice at once
        raise ValidationError(
            {"name": ValidationError("This tenant already has this domain.", code="unique")}
        ) from None
    return domain


# One answer for every name a tenant may not add, so nothing is learnt about other tenants.
_UNAVAILABLE = "This domain name cannot be added."


def domain_name_unavailable(name: str, *, tenant_id: Any) -> bool:
    """Whether ``name`` is closed to this tenant: another tenant's verified domain or one of its
    subdomains, or a name the platform serves itself (and their subdomains).

    Another tenant holding the same name *pending* does not close it: pending proves nothing,
    so a squatter cannot keep the owner out. Whoever verifies first gets it.
    """
    platform = {settings.DEMO_DOMAIN, settings.TEMP_INBOX_DOMAIN}
    if any(name == served or name.endswith("." + served) for served in platform if served):
        return True
    labels = name.split(".")
    candidates = [".".join(labels[index:]) for index in range(len(labels) - 1)]
    return (
        Domain.objects.filter(Q(platform_managed=True) | Q(state__in=Domain.CLAIMED_STATES), name__in=candidates)
        .exclude(tenant_id=tenant_id)
        .exists()
    )


def domain_update(
    *,
    principal: Principal,
    domain: Domain,
    recipient_policy: str | None = None,
    dmarc_reject: bool | None = None,
    antivirus_mode: str | None = None,
) -> Domain:
    """Change a domain's recipient policy, its refusal at DATA of mail failing DMARC under p=reject,
    or its antivirus mode ("" for the tenant's)."""
    require(principal, Permission.DOMAINS_MANAGE)
    before = _summary(domain, _DOMAIN_FIELDS)
    if recipient_policy is not None:
        domain.recipient_policy = recipient_policy
    if dmarc_reject is not None:
        domain.dmarc_reject = dmarc_reject
    if antivirus_mode is not None:
        domain.antivirus_mode = antivirus_mode
    domain.full_clean()
    with transaction.atomic():
        domain.save(update_fields=["recipient_policy", "dmarc_reject", "antivirus_mode", "updated_at"])
        audit_entry_record(
            tenant_id=domain.tenant_id,
            actor=principal.actor,
            action="domain.update",
            resource_type="domain",
            resource_id=domain.pk,
            before=before,
            after=_summary(domain, _DOMAIN_FIELDS),
        )
    return domain


def domain_delete(*, principal: Principal, domain: Domain) -> None:
    """Remove a domain. Refused while it still has mailboxes, so no mail is lost by accident."""
    require(principal, Permission.DOMAINS_MANAGE)
    if domain.mailboxes.exists():  # type: ignore[attr-defined]
        raise ValidationError(
            "Delete the domain's mailboxes first; deleting a domain never deletes mail.", code="domain_not_empty"
        )
    with transaction.atomic():
        audit_entry_record(
            tenant_id=domain.tenant_id,
            actor=principal.actor,
            action="domain.delete",
            resource_type="domain",
            resource_id=domain.pk,
            before=_summary(domain, _DOMAIN_FIELDS),
        )
        domain.delete()


# --- API keys ---------------------------------------------------------------------------
def api_key_mint(
    *,
    principal: Principal,
    name: str,
    permissions: Iterable[str],
    domains: Iterable[Domain] = (),
    mailboxes: Iterable[Any] = (),
    pools: Iterable[Any] = (),
    expires_at: datetime | None = None,
    created_by: User | None = None,
    ip_allowlist: Iterable[str] = (),
) -> tuple[ApiKey, str]:
    """Mint a key and return it with its secret, which is never available again.

    The new key can hold only permissions and resources the minting principal holds itself.
    A key minted by a key is its child: never wider than its parent in permissions, resources,
    IP allowlist and expiry (what the request leaves out is inherited, what it asks beyond
    the parent is a 400 with a ``*_exceed(s)_parent`` code), and it dies with the parent.
    """
    require(principal, Permission.KEYS_MANAGE)
    parent = principal.api_key
    wanted = sorted(set(permissions))
    unknown = [perm for perm in wanted if perm not in ALL_PERMISSIONS]
    if unknown:
        raise ValidationError({"permissions": f"Unknown permission: {', '.join(unknown)}."})
    if not wanted:
        raise ValidationError({"permissions": "Give the key at least one permission."})
    if not principal.can_grant(wanted):
        if parent is not None:
            raise _exceeds("permissions", "permissions_exceed_parent", "The key's own permissions are the limit.")
        raise PermissionDenied("A key cannot be given permissions its creator does not hold.")
    domains, mailboxes, pools = list(domains), list(mailboxes), list(pools)
    for resource in [*domains, *mailboxes, *pools]:
        if resource.tenant_id != principal.tenant.pk:
            raise ValidationError({"resources": "Unknown resource."})
    if not principal.is_tenant_wide:
        if not (domains or mailboxes or pools):  # inherit the parent's allow-list rather than the whole tenant
            domains = list(Domain.objects.filter(pk__in=principal.granted_domain_ids or ()))
            mailboxes = list(parent.allowed_mailboxes.all()) if parent is not None else []
            pools = list(parent.allowed_pools.all()) if parent is not None else []
        granted_domains = principal.granted_domain_ids or frozenset()
        outside = [domain for domain in domains if domain.pk not in granted_domains] + [
            mailbox
            for mailbox in mailboxes
            if mailbox.pk not in (principal.granted_mailbox_ids or ()) and mailbox.domain_id not in granted_domains
        ]
        # A pool is within the parent's reach if the parent was granted it or its domain.
        outside += [
            pool
            for pool in pools
            if pool.pk not in (principal.granted_pool_ids or ()) and pool.domain_id not in granted_domains
        ]
        if outside:
            raise _exceeds("resources", "resources_exceed_parent", "Only resources within the key's own allow-list.")
    if (domains or mailboxes or pools) and TENANT_WIDE_PERMISSIONS & set(wanted):
        raise ValidationError(
            {"permissions": "keys:manage and tenant:manage need a key for the whole tenant."}, code="invalid"
        )
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationError({"expires_at": "The expiry must be in the future."})
    allowlist = ip_allowlist_normalize(ip_allowlist)
    if parent is not None:
        expires_at = _child_expiry(parent, expires_at)
        allowlist = _child_allowlist(parent, allowlist)

    generated = keys.generate()
    api_key = ApiKey(
        tenant=principal.tenant,
        name=name,
        prefix=generated.prefix,
        secret_hash=generated.secret_hash,
        last_four=generated.last_four,
        permissions=wanted,
        expires_at=expires_at,
        created_by=created_by or principal.user,
        ip_allowlist=allowlist,
        parent=parent,
        scoped=bool(domains or mailboxes or pools),
    )
    api_key.full_clean()
    with transaction.atomic():
        api_key.save(force_insert=True)
        api_key.allowed_domains.set(domains)
        api_key.allowed_mailboxes.set(mailboxes)
        api_key.allowed_pools.set(pools)
        audit_entry_record(
            tenant_id=principal.tenant.pk,
            actor=principal.actor,
            action="api_key.create",
            resource_type="api_key",
            resource_id=api_key.pk,
            after={
                "name": name,
                "permissions": wanted,
                "domains": [str(domain.pk) for domain in domains],
                "mailboxes": [str(mailbox.pk) for mailbox in mailboxes],
                "pools": [str(pool.pk) for pool in pools],
                "expires_at": expires_at,
                "ip_allowlist": api_key.ip_allowlist,
                "parent": str(parent.pk) if parent is not None else None,
                "last_four": api_key.last_four,
            },
        )
    return api_key, generated.secret


def _exceeds(field: str, code: str, message: str) -> ValidationError:
    return ValidationError(
        {field: ValidationError(f"This asks for more than the minting key has. {message}", code=code)}
    )


def _child_expiry(parent: ApiKey, wanted: datetime | None) -> datetime | None:
    """The child's expiry: the one asked for, or the parent's (the nearest of its chain)."""
    limits = [key.expires_at for key in (parent, *parent.ancestors()) if key.expires_at is not None]
    limit = min(limits) if limits else None
    if limit is None:
        return wanted
    if wanted is None:
        return limit
    if wanted > limit:
        raise _exceeds("expires_at", "expiry_exceeds_parent", f"The key expires at {limit.isoformat()}.")
    return wanted


def _child_allowlist(parent: ApiKey, wanted: list[str]) -> list[str]:
    """The child's IP allowlist: the parent's when none is asked, else networks inside it."""
    chain = [networks(key.ip_allowlist) for key in (parent, *parent.ancestors()) if key.ip_allowlist]
    if not chain:
        return wanted
    if not wanted:
        return list(parent.ip_allowlist or next(key.ip_allowlist for key in parent.ancestors() if key.ip_allowlist))
    for network in networks(wanted):
        if not all(any(_subnet_of(network, allowed) for allowed in allowlist) for allowlist in chain):
            raise _exceeds(
                "ip_allowlist", "ip_allowlist_exceeds_parent", f"{network} is outside the key's own IP allowlist."
            )
    return wanted


def _subnet_of(network: Any, allowed: Any) -> bool:
    return bool(network.version == allowed.version and network.subnet_of(allowed))


def api_key_revoke(*, principal: Principal | None, api_key: ApiKey, actor: Actor | None = None) -> ApiKey:
    """Revoke a key at once. Revoking twice is harmless."""
    if principal is not None:
        require(principal, Permission.KEYS_MANAGE)
    now = timezone.now()
    with transaction.atomic():
        if api_key.revoked_at is None:
            api_key.revoked_at = now
            api_key.save(update_fields=["revoked_at"])
        # Every key minted from it, at any depth, dies with it (also when it was revoked
        # before this rule: revoking again reaches the children it left behind).
        descendants, frontier = [], [api_key.pk]
        while frontier:
            children = list(ApiKey.objects.filter(parent_id__in=frontier).values_list("pk", flat=True))
            descendants += children
            frontier = children
        revoked_children = ApiKey.objects.filter(pk__in=descendants, revoked_at__isnull=True).update(revoked_at=now)
        if api_key.revoked_at == now or revoked_children:
            audit_entry_record(
                tenant_id=api_key.tenant_id,
                actor=actor or (principal.actor if principal else Actor.system()),
                action="api_key.revoke",
                resource_type="api_key",
                resource_id=api_key.pk,
                after={"name": api_key.name, "last_four": api_key.last_four, "children_revoked": revoked_children},
            )
    return api_key


class KeyRejected(Exception):
    """The presented key does not authenticate; ``code`` says why (for the error body)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def api_key_authenticate(*, secret: str, ip: str | None) -> ApiKey:
    """The active key for ``secret``, recording its use; KeyRejected otherwise.

    last_used_at is written at most once per API_KEY_LAST_USED_RESOLUTION seconds, so a
    busy key does not turn every request into a write.
    """
    from django.conf import settings

    if not keys.is_well_formed(secret):
        raise KeyRejected("invalid_api_key", "The API key is not valid.")
    # One prefix, nearly always one row, with its tenant: SQL built once (every request pays it).
    candidates = rows_with_parent(ApiKey, "tenant", "prefix", keys.lookup_prefix(secret))
    api_key = next((key for key in candidates if keys.matches(secret, key.secret_hash)), None)
    if api_key is None:
        raise KeyRejected("invalid_api_key", "The API key is not valid.")
    if api_key.is_revoked:
        raise KeyRejected("api_key_revoked", "The API key has been revoked.")
    if api_key.is_expired:
        raise KeyRejected("api_key_expired", "The API key has expired.")
    for ancestor in api_key.ancestors():  # a child dies with the key that minted it
        if ancestor.is_revoked:
            raise KeyRejected("api_key_revoked", "The API key has been revoked.")
        if ancestor.is_expired:
            raise KeyRejected("api_key_expired", "The API key has expired.")
    now = timezone.now()
    stale = api_key.last_used_at is None or (now - api_key.last_used_at).total_seconds() > (
        settings.API_KEY_LAST_USED_RESOLUTION
    )
    if ip is not None and ip not in api_key.known_ips:
        _api_key_new_ip(api_key, ip)
    if stale or api_key.last_used_ip != ip:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now, last_used_ip=ip)
        api_key.last_used_at, api_key.last_used_ip = now, ip
    return api_key


_KNOWN_IPS = 20


def _api_key_new_ip(api_key: ApiKey, ip: str) -> None:
    """Remember the address and audit the key's first use from it."""
    with transaction.atomic():
        locked = ApiKey.objects.select_for_update().get(pk=api_key.pk)
        if ip in locked.known_ips:
            return
        locked.known_ips = [*locked.known_ips, ip][-_KNOWN_IPS:]
        locked.save(update_fields=["known_ips"])
        audit_entry_record(
            tenant_id=api_key.tenant_id,
            actor=Actor(type="api_key", label=f"{api_key.name} (mp_…{api_key.last_four})", api_key_id=api_key.pk),
            action="api_key.new_ip",
            resource_type="api_key",
            resource_id=api_key.pk,
            after={"ip": ip},
        )
    api_key.known_ips = locked.known_ips


# --- Domain verification and MX monitoring ------------------------------------------------
@dataclass(frozen=True)
class DomainCheck:
    """What one DNS check found, and what it changed."""

    txt_ok: bool
    mx_ok: bool
    error: str
    previous_state: str
    state: str

    @property
    def changed(self) -> bool:
        return self.previous_state != self.state

    def as_json(self) -> dict[str, Any]:
        return {"txt": self.txt_ok, "mx": self.mx_ok, "error": self.error or None, "state": self.state}


_TRANSITION_EVENTS: dict[str, str] = {
    Domain.State.VERIFIED: "domain.verified",
    Domain.State.MX_LOST: "domain.mx_lost",
    Domain.State.SUSPENDED: "domain.suspended",
}


def _failure_confirmed(domain: Domain, now: datetime) -> bool:
    """Whether the current failure streak (this check included) is long enough to suspend:
    DOMAIN_FAILURE_STREAK consecutive failed checks spanning DOMAIN_FAILURE_PERIOD."""
    since = domain.failing_since or now
    return (
        domain.failed_checks + 1 >= max(2, settings.DOMAIN_FAILURE_STREAK)  # never a single check
        and (now - since).total_seconds() >= settings.DOMAIN_FAILURE_PERIOD
    )


def _next_state(domain: Domain, *, txt_ok: bool, mx_ok: bool, now: datetime) -> str:
    """The two-layer policy: a lost MX is soft (451) while the TXT record proves the owner
    is still there, and hard (550) once the TXT record is gone or the grace has passed.

    Hard needs a confirmed failure streak as well, never one check: a resolver that answered
    NXDOMAIN once, or records being edited, must not bounce a tenant's mail."""
    state = domain.state
    if txt_ok and mx_ok:
        return Domain.State.VERIFIED
    if state == Domain.State.PENDING:
        return state
    confirmed = _failure_confirmed(domain, now)
    if not txt_ok:
        return Domain.State.SUSPENDED if confirmed else state
    if state == Domain.State.VERIFIED:
        return Domain.State.MX_LOST
    if state == Domain.State.MX_LOST:
        lost_since = domain.mx_lost_at or now
        if confirmed and (now - lost_since).total_seconds() >= settings.DOMAIN_MX_GRACE:
            return Domain.State.SUSPENDED
    return state


_NOT_VERIFIABLE = "This domain name cannot be verified for this tenant."


def domain_check(*, domain: Domain, now: datetime | None = None) -> DomainCheck:
    """Look the domain's TXT and MX records up and move its state accordingly.

    Verified needs both the TXT record ``mailplatform-verification=<token>`` and an MX
    pointing at one of MX_HOSTS; a domain with no MX falls back to its A/AAAA address
    (RFC 5321 section 5.1), which is never ours. A DNS failure (timeout, SERVFAIL) is a doubt,
    not an answer: it changes nothing and does not count towards a failure streak. A
    platform-managed domain is never checked. A pending name verifies for the first tenant
    to prove it; the others stay pending, told only that it cannot be verified.
    """
    from tenants import dns

    now = now or timezone.now()
    previous = domain.state
    if domain.platform_managed:
        return DomainCheck(True, True, "", previous, previous)
    try:
        records = dns.domain_records(domain.name)
    except dns.LookupFailed as failure:
        Domain.objects.filter(pk=domain.pk).update(last_checked_at=now, last_check_error=str(failure)[:300])
        domain.last_checked_at, domain.last_check_error = now, str(failure)[:300]
        return DomainCheck(domain.txt_ok, domain.mx_ok, str(failure), previous, previous)
    txt_ok = domain.verification_record in records.txt
    mx_ok = bool(set(records.mx) & set(settings.MX_HOSTS))
    try:
        with transaction.atomic():
            return _domain_check_apply(domain, txt_ok=txt_ok, mx_ok=mx_ok, now=now)
    except IntegrityError:
        # Another tenant verified the same name a moment ago (the partial unique constraint).
        Domain.objects.filter(pk=domain.pk).update(
            txt_ok=txt_ok, mx_ok=mx_ok, last_checked_at=now, last_check_error=_NOT_VERIFIABLE
        )
        domain.refresh_from_db()
        return DomainCheck(txt_ok, mx_ok, _NOT_VERIFIABLE, previous, domain.state)


def _domain_check_apply(domain: Domain, *, txt_ok: bool, mx_ok: bool, now: datetime) -> DomainCheck:
    locked = Domain.objects.select_for_update().get(pk=domain.pk)
    previous = locked.state  # someone else may have moved it meanwhile: decide on the row as it is
    state = _next_state(locked, txt_ok=txt_ok, mx_ok=mx_ok, now=now)
    error = ""
    winning = previous == Domain.State.PENDING and state == Domain.State.VERIFIED
    if winning and domain_name_unavailable(locked.name, tenant_id=locked.tenant_id):
        state, error = previous, _NOT_VERIFIABLE  # another tenant verified it first
    domain = locked
    domain.txt_ok, domain.mx_ok, domain.last_check_error, domain.last_checked_at = txt_ok, mx_ok, error, now
    if (txt_ok and mx_ok) or state == Domain.State.PENDING:
        domain.failed_checks, domain.failing_since = 0, None
    else:
        domain.failed_checks += 1
        domain.failing_since = domain.failing_since or now
    if state != previous:
        domain.state = state
        if state == Domain.State.VERIFIED:
            domain.verified_at = domain.verified_at or now
            domain.mx_lost_at = domain.suspended_at = None
        elif state == Domain.State.MX_LOST:
            domain.mx_lost_at = now
        elif state == Domain.State.SUSPENDED:
            domain.suspended_at = now
        restored = state == Domain.State.VERIFIED and previous != Domain.State.PENDING
        event_type = "domain.mx_restored" if restored else _TRANSITION_EVENTS[state]
        event_record(
            tenant_id=domain.tenant_id,
            type=event_type,
            data={"name": domain.name, "previous_state": previous, "state": state, "txt": txt_ok, "mx": mx_ok},
            domain_id=domain.pk,
        )
        audit_entry_record(
            tenant_id=domain.tenant_id,
            actor=Actor.system("domain check"),
            action="domain.state_change",
            resource_type="domain",
            resource_id=domain.pk,
            before={"state": previous},
            after={"state": state},
        )
        transaction.on_commit(lambda: _admins_notify(domain, event_type))
    domain.save()
    return DomainCheck(txt_ok, mx_ok, error, previous, domain.state)


def domain_verify(*, principal: Principal, domain: Domain) -> DomainCheck:
    """Check a domain now, on request (the API's and console's "verify" button)."""
    require(principal, Permission.DOMAINS_MANAGE)
    result = domain_check(domain=domain)
    audit_entry_record(
        tenant_id=domain.tenant_id,
        actor=principal.actor,
        action="domain.verify",
        resource_type="domain",
        resource_id=domain.pk,
        after=result.as_json(),
    )
    domain.refresh_from_db()
    return result


_NOTICES = {
    "domain.verified": "is verified: mail for it is now accepted.",
    "domain.mx_restored": "points at us again: mail for it is accepted again.",
    "domain.mx_lost": (
        "no longer has an MX record pointing at us. Senders are asked to retry later (451) while the "
        "TXT record is in place; the domain will be suspended if this lasts."
    ),
    "domain.suspended": "is suspended: mail for it is refused (550) until its DNS records point at us again.",
}


def _admins_notify(domain: Domain, event_type: str) -> None:
    recipients = list(
        Membership.objects.filter(
            tenant_id=domain.tenant_id, role__in=[Membership.Role.OWNER, Membership.Role.ADMIN], user__is_active=True
        ).values_list("user__email", flat=True)
    )
    if not recipients:
        return
    records = ", ".join(settings.MX_HOSTS)
    body = (
        f"The domain {domain.name} {_NOTICES[event_type]}\n\n"
        f"Expected DNS records:\n  TXT  {domain.name}  {domain.verification_record}\n  MX   {domain.name}  {records}\n"
    )
    try:
        send_mail(f"[mailplatform] {domain.name}: {event_type}", body, None, recipients)
    except Exception:  # the outbound channel being down must not undo the state change
        logger.exception("could not e-mail the admins of tenant %s about %s", domain.tenant_id, event_type)


def domains_due_for_check(*, now: datetime | None = None) -> list[UUID]:
    """Domains whose last check is older than DOMAIN_CHECK_INTERVAL (pending ones included)."""
    now = now or timezone.now()
    threshold = now - timedelta(seconds=settings.DOMAIN_CHECK_INTERVAL)
    due = Domain.objects.filter(Q(last_checked_at__isnull=True) | Q(last_checked_at__lt=threshold)).exclude(
        platform_managed=True
    )
    return list(due.order_by("last_checked_at").values_list("pk", flat=True)[:5000])


# --- Single sign-on ---------------------------------------------------------------------------
_SSO_FIELDS = ("issuer", "client_id", "scopes", "default_role", "role_claim", "role_mapping", "require_sso", "enabled")


def sso_provider_configure(
    *,
    principal: Principal,
    issuer: str,
    client_id: str,
    email_domains: Iterable[str],
    client_secret: str | None = None,
    scopes: str = "openid email profile",
    default_role: str = Membership.Role.MEMBER,
    role_claim: str = "",
    role_mapping: dict[str, str] | None = None,
    require_sso: bool = False,
    enabled: bool = True,
) -> SsoProvider:
    """Create or replace the tenant's OpenID provider (enterprise plan only).

    The issuer's discovery document is fetched now, so a wrong issuer is a clear 400 and not
    a broken sign-in later. The client secret is encrypted; omit it to keep the current one.
    """
    from tenants import crypto, sso
    from tenants.selectors import sso_domains_verified

    require(principal, Permission.TENANT_MANAGE)
    tenant = principal.tenant
    if tenant.plan != Tenant.Plan.ENTERPRISE:
        raise PermissionDenied("Single sign-on is part of the enterprise plan.")
    domains = sorted({domain_name_normalize(name) for name in email_domains})
    if not domains:
        raise ValidationError({"email_domains": "Name at least one e-mail domain your people use."})
    # Only a domain this tenant proved by DNS is its to sign people in for: otherwise its own
    # provider could vouch for anyone's address (another tenant's owner, the platform's staff).
    unverified = [name for name in domains if name not in sso_domains_verified(tenant.pk, domains)]
    if unverified:
        message = f"{unverified[0]} is not a verified domain of this tenant: add it and verify its DNS TXT record."
        raise ValidationError({"email_domains": ValidationError(message, code="sso_domain_not_verified")})
    taken = SsoDomain.objects.filter(name__in=domains).exclude(provider__tenant=tenant)
    if taken.exists():
        raise ValidationError({"email_domains": f"{taken.first()} is claimed by another tenant."})
    roles = set(SsoProvider.Role.values)
    if default_role not in roles or any(role not in roles for role in (role_mapping or {}).values()):
        raise ValidationError({"role_mapping": f"Roles are {', '.join(sorted(roles))} (owners are never mapped)."})
    if "openid" not in scopes.split():
        raise ValidationError({"scopes": "The scopes must include openid."})
    existing = SsoProvider.objects.filter(tenant=tenant).first()
    if existing is None and not client_secret:
        raise ValidationError({"client_secret": "The client secret is required."})
    provider = existing or SsoProvider(tenant=tenant)
    before = _summary(existing, _SSO_FIELDS) | {"email_domains": existing.email_domains} if existing else None
    provider.issuer, provider.client_id, provider.scopes = issuer, client_id, scopes
    provider.default_role, provider.role_claim, provider.role_mapping = default_role, role_claim, role_mapping or {}
    provider.require_sso, provider.enabled = require_sso, enabled
    if client_secret:
        provider.client_secret_encrypted = crypto.encrypt(client_secret)
    provider.full_clean(exclude=["client_secret_encrypted"])
    try:
        sso.discovery(provider, refresh=True)  # kept on the instance, saved below
    except sso.SsoError as failure:
        # One answer whatever went wrong: what the issuer's host said (or that it refused a
        # connection) must not be readable through this API (a port and content oracle).
        logger.warning("sso discovery for tenant %s failed: %s", tenant.pk, failure)
        message = (
            "The issuer's discovery document could not be fetched or used. Check the issuer URL "
            "(https, a public host, /.well-known/openid-configuration naming the same issuer)."
        )
        raise ValidationError({"issuer": ValidationError(message, code=failure.code)}) from None
    with transaction.atomic():
        provider.save()
        provider.domains.exclude(name__in=domains).delete()  # type: ignore[attr-defined]
        for name in domains:
            SsoDomain.objects.get_or_create(name=name, provider=provider)
        audit_entry_record(
            tenant_id=tenant.pk,
            actor=principal.actor,
            action="sso.configure",
            resource_type="sso_provider",
            resource_id=provider.pk,
            before=before,
            after=_summary(provider, _SSO_FIELDS)
            | {"email_domains": domains, "client_secret_changed": bool(client_secret)},
        )
    return provider


def sso_provider_delete(*, principal: Principal) -> None:
    require(principal, Permission.TENANT_MANAGE)
    provider = SsoProvider.objects.filter(tenant=principal.tenant).first()
    if provider is None:
        return
    with transaction.atomic():
        audit_entry_record(
            tenant_id=principal.tenant.pk,
            actor=principal.actor,
            action="sso.delete",
            resource_type="sso_provider",
            resource_id=provider.pk,
            before=_summary(provider, _SSO_FIELDS) | {"email_domains": provider.email_domains},
        )
        provider.delete()


def sso_sign_in_refused(*, provider: SsoProvider, email: str, user: User | None, reason: str) -> None:
    """Audit a refused SSO sign-in (``auth.login_failed``) where someone should look at it.

    In the provider's tenant, and in every tenant of the existing account the provider named
    (or the platform's own log, for an account in none): someone else's provider asserting
    your address is for you to see, not only for the tenant that tried. The other tenants'
    entries name the account, never the tenant whose provider tried (tenants never see each other).
    """
    actor = Actor(type="user", label=email[:254])
    after = {"method": "sso", "reason": reason}
    audit_entry_record(
        tenant_id=provider.tenant_id,
        actor=actor,
        action="auth.login_failed",
        resource_type="sso_provider",
        resource_id=provider.pk,
        after=after,
    )
    if user is None:
        return
    memberships = Membership.objects.filter(user=user).exclude(tenant=provider.tenant_id)
    others: list[Any] = list(memberships.values_list("tenant_id", flat=True))
    for tenant_id in others or ([None] if user.is_staff or user.is_superuser else []):
        audit_entry_record(
            tenant_id=tenant_id,
            actor=actor,
            action="auth.login_failed",
            resource_type="user",
            resource_id=user.pk,
            after=after,
        )


def sso_sign_in(*, provider: SsoProvider, user: User, role: str) -> Membership:
    """Just-in-time membership for someone the tenant's provider vouched for.

    The provider's role mapping is authoritative on every sign-in, except that an owner is
    never demoted by it.
    """
    actor = Actor(type="user", label=user.email, user_id=user.pk)
    membership = Membership.objects.filter(tenant=provider.tenant, user=user).first()
    if membership is None or (membership.role != role and membership.role != Membership.Role.OWNER):
        membership = membership_set(tenant=provider.tenant, user=user, role=role, actor=actor)
    audit_entry_record(
        tenant_id=provider.tenant_id,
        actor=actor,
        action="auth.login",
        resource_type="user",
        resource_id=user.pk,
        after={"method": "sso", "issuer": provider.issuer, "role": membership.role},
    )
    return membership
