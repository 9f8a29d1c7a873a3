"""Writes of the web side: sign-in links, sessions, temporary inboxes, member invitations."""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.mail import EmailMessage
from django.db import IntegrityError, connections, transaction
from django.db.models import F, Q
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone

from audit import context
from audit.services import Actor, audit_entry_record
from ingest.platform_mail import signin_mail_headers
from mailplatform import ratelimit
from tenants.access import Permission, Principal, tenant_ensure_active
from tenants.models import Domain, Membership, Tenant, User
from tenants.services import require
from webinbox.models import LoginToken, SessionGeneration, TempInbox
from webinbox.selectors import sso_required_for

logger = logging.getLogger(__name__)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- Sign-in links -------------------------------------------------------------------------
def login_link_create(*, user: User, binding: str = "") -> str:
    """A single-use sign-in URL on BASE_URL (never the request's Host), valid LOGIN_LINK_TTL.

    With ``binding`` (the secret of a cookie set on the browser that asked), only that
    browser can use the link: a forwarded or intercepted link signs nobody in.
    """
    token = secrets.token_urlsafe(32)
    LoginToken.objects.create(
        user=user,
        token_hash=_hash(token),
        binding_hash=_hash(binding) if binding else "",
        expires_at=timezone.now() + timedelta(seconds=settings.LOGIN_LINK_TTL),
    )
    return settings.BASE_URL + reverse("webinbox:login-link", args=[token])


def login_link_consume(*, token: str, binding: str = "") -> User | None:
    """The user the link signs in, once; None for a used, expired or unknown link, or a bound
    link opened without its browser's cookie (which leaves the link usable by that browser)."""
    now = timezone.now()
    bound_here = Q(binding_hash="") | Q(binding_hash=_hash(binding)) if binding else Q(binding_hash="")
    with transaction.atomic():
        claimed = (
            LoginToken.objects.filter(token_hash=_hash(token), used_at__isnull=True, expires_at__gt=now)
            .filter(bound_here)
            .update(used_at=now)
        )
        if not claimed:
            return None
        login_token = LoginToken.objects.select_related("user").get(token_hash=_hash(token))
    user = login_token.user
    # A link sent before the tenant turned on "require SSO" no longer signs in.
    return user if user.is_active and not sso_required_for(user.email) else None


# Sign-in requests are served off the request path: the answer to /login/ does the same work
# (validate, count, hand over) whether or not the address exists, and an SMTP relay's
# slowness never shows. Tests wait for the hand-over with outbound_flush().
_outbound: list[threading.Thread] = []


def _in_background(work: Callable[[], object], name: str) -> None:
    def run() -> None:
        try:
            work()
        except Exception as exc:  # never the link itself in a log line
            logger.warning("%s failed: %s", name, type(exc).__name__)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, name=name, daemon=True)
    _outbound[:] = [pending for pending in _outbound if pending.is_alive()]
    _outbound.append(thread)
    thread.start()


def signin_mail_send(*, subject: str, body: str, recipient: str) -> None:
    """Send sign-in or invitation mail through EMAIL_URL, marked as such (a keyed, dated
    signature header) so that, should the address be one of our own mailboxes, the drainer
    drops it instead of making it readable mail (:mod:`ingest.platform_mail`)."""
    EmailMessage(subject, body, None, [recipient], headers=signin_mail_headers(recipient)).send()


def signin_mail_destination() -> str:
    """Where sign-in mail goes, for the operator: the folder of the file backend (the embedded
    default, one file a message), else the mail server of EMAIL_URL. Never a credential."""
    if settings.EMAIL_BACKEND == "django.core.mail.backends.filebased.EmailBackend":
        return f"{settings.EMAIL_FILE_PATH}/ (one file a message)"
    if settings.EMAIL_HOST:
        return f"{settings.EMAIL_HOST}:{settings.EMAIL_PORT} (EMAIL_URL)"
    return settings.EMAIL_BACKEND.rsplit(".", 2)[-2] + " backend (EMAIL_URL)"


def _send_in_background(subject: str, body: str, recipient: str) -> None:
    _in_background(lambda: signin_mail_send(subject=subject, body=body, recipient=recipient), "sign-in mail")


def outbound_flush(timeout: float = 10.0) -> None:
    """Wait for sign-in work handed to the background (tests, and a clean shutdown)."""
    for thread in list(_outbound):
        thread.join(timeout)


def login_request(*, email: str, ip: str | None, binding: str = "") -> None:
    """Send a sign-in link if ``email`` is an active member and the rate limits allow.

    Only the rate limits are counted here; looking the address up, making the link and
    mailing it happen in the background, so the caller answers "check your inbox" in the
    same time whether or not the address exists.
    """
    email = User.objects.normalize_email(email.strip()).lower()
    allowed_address = ratelimit.hit(
        "login-address", email, limit=settings.LOGIN_RATE_PER_ADDRESS, window=settings.LOGIN_RATE_WINDOW
    )
    allowed_ip = ratelimit.hit_ip("login-ip", ip, limit=settings.LOGIN_RATE_PER_IP, window=settings.LOGIN_RATE_WINDOW)
    if not (allowed_address and allowed_ip):
        logger.info("sign-in link request rate-limited")
        return
    _in_background(lambda: login_link_send(email=email, binding=binding), "sign-in link")


def login_link_send(*, email: str, binding: str = "") -> bool:
    """Mail a sign-in link to the active member with this address; False when there is none."""
    user = User.objects.filter(email__iexact=email, is_active=True, memberships__isnull=False).distinct().first()
    if user is None or sso_required_for(user.email):  # their company turned magic links off
        return False
    link = login_link_create(user=user, binding=binding)
    minutes = settings.LOGIN_LINK_TTL // 60
    body = (
        f"Sign in to mailplatform:\n\n{link}\n\n"
        f"The link works once, for {minutes} minutes. If you did not ask for it, ignore this message.\n"
    )
    signin_mail_send(subject="Your mailplatform sign-in link", body=body, recipient=user.email)
    return True


def _tenant_ids_of(user: User) -> list[Any]:
    return list(Membership.objects.filter(user=user).values_list("tenant_id", flat=True))


def login_record(*, user: User, method: str = "link") -> None:
    """Audit a sign-in (``auth.login``) in each of the user's tenants."""
    actor = Actor(type="user", label=user.email, user_id=user.pk)
    for tenant_id in _tenant_ids_of(user) or [None]:
        audit_entry_record(
            tenant_id=tenant_id, actor=actor, action="auth.login", resource_type="user", resource_id=user.pk,
            after={"method": method},
        )  # fmt: skip


def login_failure_record(*, reason: str) -> None:
    """Audit a refused sign-in (``auth.login_failed``); the link's owner is unknown by design."""
    audit_entry_record(
        tenant_id=None, actor=Actor(type="user", label="anonymous"), action="auth.login_failed",
        resource_type="user", after={"reason": reason},
    )  # fmt: skip


# --- Sessions ---------------------------------------------------------------------------
def session_generation_stamp(sender: Any, request: HttpRequest, user: User, **kwargs: Any) -> None:
    """``user_logged_in`` receiver: the new session belongs to the user's current generation."""
    from webinbox.middleware import SESSION_GENERATION_KEY
    from webinbox.selectors import session_generation_of

    if request is not None and hasattr(request, "session"):
        request.session[SESSION_GENERATION_KEY] = session_generation_of(user)


def sign_out_everywhere(*, user: User) -> int:
    """End every session of ``user`` (all browsers) at their next request; returns the new generation."""
    with transaction.atomic():
        row, _ = SessionGeneration.objects.select_for_update().get_or_create(user=user)
        row.generation = F("generation") + 1
        row.save(update_fields=["generation", "changed_at"])
        row.refresh_from_db()
        actor = Actor(type="user", label=user.email, user_id=user.pk)
        for tenant_id in _tenant_ids_of(user) or [None]:
            audit_entry_record(
                tenant_id=tenant_id, actor=actor, action="auth.logout_everywhere", resource_type="user",
                resource_id=user.pk,
            )  # fmt: skip
    return row.generation


# --- Temporary inboxes ------------------------------------------------------------------
TEMP_TENANT_SLUG = "temporary-inboxes"


def temp_tenant_get_or_create() -> tuple[Tenant, Domain]:
    """The platform-owned tenant (plan temporary) and its verified TEMP_INBOX_DOMAIN; idempotent."""
    from tenants.services import tenant_create

    tenant = Tenant.objects.filter(slug=TEMP_TENANT_SLUG).first()
    if tenant is None:
        try:
            with transaction.atomic():
                tenant = tenant_create(
                    name="Temporary inboxes", slug=TEMP_TENANT_SLUG, plan=Tenant.Plan.TEMPORARY,
                    actor=Actor.system("temporary inboxes"),
                )  # fmt: skip
        except (IntegrityError, ValidationError):
            tenant = Tenant.objects.get(slug=TEMP_TENANT_SLUG)
        if tenant.slug != TEMP_TENANT_SLUG:  # another request won the race; tenant_create picked a new slug
            Tenant.objects.filter(pk=tenant.pk).delete()
            tenant = Tenant.objects.get(slug=TEMP_TENANT_SLUG)
    named = Domain.objects.filter(name=settings.TEMP_INBOX_DOMAIN)
    claimed = named.filter(state__in=Domain.CLAIMED_STATES)
    domain = claimed.first() or named.filter(tenant=tenant).first()
    if domain is None:
        try:
            with transaction.atomic():
                domain = Domain.objects.create(
                    tenant=tenant, name=settings.TEMP_INBOX_DOMAIN, state=Domain.State.VERIFIED,
                    verified_at=timezone.now(), platform_managed=True,
                )  # fmt: skip
        except IntegrityError:
            domain = claimed.get()
    if domain.tenant_id != tenant.pk:
        raise RuntimeError(f"TEMP_INBOX_DOMAIN {domain.name} belongs to another tenant")
    return tenant, platform_domain_ensure(domain)


def platform_domain_ensure(domain: Domain) -> Domain:
    """Mark a domain the platform serves as such and verified: tenant DNS checks never apply
    to it (and heal one that an earlier version's check suspended)."""
    if not domain.platform_managed or domain.state != Domain.State.VERIFIED:
        Domain.objects.filter(pk=domain.pk).update(
            platform_managed=True, state=Domain.State.VERIFIED, verified_at=domain.verified_at or timezone.now(),
            suspended_at=None, mx_lost_at=None, failed_checks=0, failing_since=None, updated_at=timezone.now(),
        )  # fmt: skip
        domain.refresh_from_db()
    return domain


class RateLimited(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("Too many requests.")
        self.retry_after = retry_after


def temp_inbox_create(*, ip: str | None) -> tuple[TempInbox, str]:
    """A new temporary inbox with a random address (80 bits) and its link token (256 bits).

    Returns the inbox and the token, which is never available again (only its hash is kept).
    Raises :class:`RateLimited` past TEMP_INBOX_RATE_PER_HOUR per client IP.
    """
    from mailboxes.models import Mailbox
    from mailboxes.services import mailbox_create

    tenant, domain = temp_tenant_get_or_create()
    tenant_ensure_active(tenant)  # suspended by staff: no new inboxes either (TenantSuspended)
    if not ratelimit.hit_ip("temp-inbox", ip, limit=settings.TEMP_INBOX_RATE_PER_HOUR, window=3600):
        raise RateLimited(ratelimit.seconds_left_ip(3600, "temp-inbox", ip, limit=settings.TEMP_INBOX_RATE_PER_HOUR))
    principal = Principal.system(tenant, "temporary inboxes")
    token = secrets.token_urlsafe(32)
    with transaction.atomic():
        mailbox = mailbox_create(
            principal=principal, domain=domain, kind=Mailbox.Kind.TEMPORARY, name="Temporary inbox",
            expires_at=timezone.now() + timedelta(seconds=settings.TEMP_INBOX_TTL),
        )  # fmt: skip
        temp_inbox = TempInbox.objects.create(mailbox=mailbox, token_hash=_hash(token), created_ip=ip)
    return temp_inbox, token


def temp_inbox_extend(*, temp_inbox: TempInbox) -> TempInbox:
    """Push the expiry back by TEMP_INBOX_EXTENSION, at most TEMP_INBOX_EXTENSIONS times."""
    from mailboxes.services import mailbox_update

    if temp_inbox.extensions >= settings.TEMP_INBOX_EXTENSIONS:
        raise ValidationError("This inbox cannot be extended any more.", code="limit")
    mailbox = temp_inbox.mailbox
    principal = Principal.system(mailbox.tenant, "temporary inbox")
    with transaction.atomic():
        claimed = TempInbox.objects.filter(pk=temp_inbox.pk, extensions__lt=settings.TEMP_INBOX_EXTENSIONS).update(
            extensions=F("extensions") + 1
        )
        if not claimed:
            raise ValidationError("This inbox cannot be extended any more.", code="limit")
        base = max(mailbox.expires_at or timezone.now(), timezone.now())
        mailbox_update(
            principal=principal, mailbox=mailbox, expires_at=base + timedelta(seconds=settings.TEMP_INBOX_EXTENSION)
        )
    temp_inbox.refresh_from_db()
    return temp_inbox


def temp_inbox_delete(*, temp_inbox: TempInbox) -> None:
    """Delete now: the inbox expires at once, so its link stops working this instant, and the
    retention sweeper removes its messages and blobs (``mailbox.expired``)."""
    from mailboxes.services import mailbox_update

    mailbox = temp_inbox.mailbox
    principal = Principal.system(mailbox.tenant, "temporary inbox")
    mailbox_update(principal=principal, mailbox=mailbox, expires_at=timezone.now() - timedelta(seconds=1))
    try:
        from mailboxes.retention import mailboxes_expire

        mailboxes_expire(limit=5)
    except Exception as exc:  # the sweeper will finish it
        logger.warning("immediate removal of a temporary inbox failed: %s", type(exc).__name__)


# --- Members ----------------------------------------------------------------------------
def member_invite(*, principal: Principal, email: str, role: str) -> Membership:
    """Add (or re-role) a member by e-mail and tell them where to sign in.

    The invitation carries no sign-in link: it is opened in a browser nobody asked from, so
    a link in it would sign in whoever reads the mail first (a colleague with access to the
    mailbox it lands in). The invitee asks for a link at /login/, which is single-use,
    short-lived and bound to the browser that asked.
    """
    from tenants.services import membership_set, user_get_or_create

    require(principal, Permission.TENANT_MANAGE)
    if role == Membership.Role.OWNER and principal.role not in (None, Membership.Role.OWNER):
        raise PermissionDenied("Only an owner can make someone an owner.")
    email = email.strip()
    if not email or "@" not in email:
        raise ValidationError({"email": "Enter an e-mail address."})
    user = user_get_or_create(email=email)
    existing = Membership.objects.filter(tenant=principal.tenant, user=user).first()
    if existing is not None and existing.role == Membership.Role.OWNER and principal.role != Membership.Role.OWNER:
        raise PermissionDenied("Only an owner can change an owner's role.")
    if existing is not None and existing.role == Membership.Role.OWNER and role != Membership.Role.OWNER:
        _last_owner_guard(principal.tenant, existing)
    membership = membership_set(tenant=principal.tenant, user=user, role=role, actor=principal.actor)
    if existing is None and user.is_active:
        login_page = settings.BASE_URL + reverse("webinbox:login")
        body = (
            f"{principal.actor.label} invited you to {principal.tenant.name} on mailplatform.\n\n"
            f"Sign in at {login_page} with this address ({user.email}): you will get a sign-in "
            f"link that works once, for {settings.LOGIN_LINK_TTL // 60} minutes, in the browser "
            "you asked from.\n"
        )
        transaction.on_commit(lambda: _send_in_background("You are invited to mailplatform", body, user.email))
    return membership


def _last_owner_guard(tenant: Tenant, membership: Membership) -> None:
    owners = Membership.objects.filter(tenant=tenant, role=Membership.Role.OWNER).exclude(pk=membership.pk)
    if not owners.exists():
        raise ValidationError("A tenant needs at least one owner.", code="last_owner")


def member_remove(*, principal: Principal, membership: Membership) -> None:
    """Remove a member from the tenant (never the last owner)."""
    require(principal, Permission.TENANT_MANAGE)
    if membership.tenant_id != principal.tenant.pk:
        raise PermissionDenied("Unknown member.")
    if membership.role == Membership.Role.OWNER:
        if principal.role != Membership.Role.OWNER:
            raise PermissionDenied("Only an owner can remove an owner.")
        _last_owner_guard(principal.tenant, membership)
    with transaction.atomic():
        audit_entry_record(
            tenant_id=principal.tenant.pk, actor=principal.actor, action="membership.delete",
            resource_type="membership", resource_id=membership.pk,
            before={"user": membership.user.email, "role": membership.role},
        )  # fmt: skip
        membership.delete()


def demo_bootstrap() -> dict[str, str]:
    """The demo tenant, member, verified domain and mailbox (created once), a new API key and
    a new sign-in link. Safe to run any number of times."""
    from mailboxes.models import Mailbox
    from mailboxes.services import mailbox_create
    from tenants.access import ALL_PERMISSIONS
    from tenants.services import api_key_mint, membership_set, tenant_create, user_get_or_create

    actor = Actor.system("bootstrap_demo")
    with transaction.atomic():
        user = user_get_or_create(email=settings.DEMO_USER_EMAIL, name="Demo")
        tenant = Tenant.objects.filter(slug="demo").first() or tenant_create(name="Demo", slug="demo", actor=actor)
        membership_set(tenant=tenant, user=user, role=Membership.Role.OWNER, actor=actor)
        principal = Principal.system(tenant, "bootstrap_demo")
        named = Domain.objects.filter(name=settings.DEMO_DOMAIN)
        domain = named.filter(state__in=Domain.CLAIMED_STATES).first() or named.filter(tenant=tenant).first()
        if domain is None:
            domain = Domain.objects.create(
                name=settings.DEMO_DOMAIN, tenant=tenant, state=Domain.State.VERIFIED, verified_at=timezone.now(),
                platform_managed=True,
            )  # fmt: skip
        if domain.tenant_id != tenant.pk:
            raise RuntimeError(f"DEMO_DOMAIN {domain.name} belongs to another tenant")
        domain = platform_domain_ensure(domain)
        mailbox = Mailbox.objects.filter(domain=domain, local_part="hello").first() or mailbox_create(
            principal=principal, domain=domain, local_part="hello", name="Demo inbox"
        )
        api_key, secret = api_key_mint(
            principal=principal, name=f"demo key {timezone.now():%Y-%m-%d %H:%M:%S}", permissions=ALL_PERMISSIONS
        )
    return {
        "tenant": tenant.slug,
        "tenant_id": str(tenant.pk),
        "domain": domain.name,
        "mailbox": mailbox.address,
        "mailbox_id": str(mailbox.pk),
        "api_key": secret,
        "api_key_id": str(api_key.pk),
        "login_url": login_link_create(user=user),
        "user": user.email,
        "sign_in_mail": signin_mail_destination(),
    }


def login_tokens_purge(*, grace: timedelta = timedelta(days=1)) -> int:
    """Delete sign-in links that expired or were used more than ``grace`` ago; return how many.

    Only hashes are stored, so this is housekeeping, not security: a used or expired link is
    already refused. Idempotent, so running it twice (or on two workers) is harmless.
    """
    cutoff = timezone.now() - grace
    deleted, _ = LoginToken.objects.filter(Q(expires_at__lt=cutoff) | Q(used_at__lt=cutoff)).delete()
    return deleted


def client_ip() -> str | None:
    """The client address the request context resolved (TRUSTED_PROXIES-aware)."""
    return context.current().ip
