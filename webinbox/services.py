"""Sign-in links."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from tenants.models import User
from webinbox.models import LoginToken


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def login_link_create(*, user: User) -> str:
    """A single-use sign-in URL on BASE_URL (never the request's Host), valid LOGIN_LINK_TTL."""
    token = secrets.token_urlsafe(32)
    LoginToken.objects.create(
        user=user,
        token_hash=_hash(token),
        expires_at=timezone.now() + timedelta(seconds=settings.LOGIN_LINK_TTL),
    )
    return settings.BASE_URL + reverse("webinbox:login-link", args=[token])


def login_link_consume(*, token: str) -> User | None:
    """The user the link signs in, once; None for a used, expired or unknown link."""
    now = timezone.now()
    with transaction.atomic():
        claimed = LoginToken.objects.filter(token_hash=_hash(token), used_at__isnull=True, expires_at__gt=now).update(
            used_at=now
        )
        if not claimed:
            return None
        login_token = LoginToken.objects.select_related("user").get(token_hash=_hash(token))
    user = login_token.user
    return user if user.is_active else None


def demo_bootstrap() -> dict[str, str]:
    """The demo tenant, member, verified domain and mailbox (created once), a new API key and
    a new sign-in link. Safe to run any number of times."""
    from audit.services import Actor
    from mailboxes.models import Mailbox
    from mailboxes.services import mailbox_create
    from tenants.access import ALL_PERMISSIONS, Principal
    from tenants.models import Domain, Membership, Tenant
    from tenants.services import api_key_mint, membership_set, tenant_create, user_get_or_create

    actor = Actor.system("bootstrap_demo")
    with transaction.atomic():
        user = user_get_or_create(email=settings.DEMO_USER_EMAIL, name="Demo")
        tenant = Tenant.objects.filter(slug="demo").first() or tenant_create(name="Demo", slug="demo", actor=actor)
        membership_set(tenant=tenant, user=user, role=Membership.Role.OWNER, actor=actor)
        principal = Principal.system(tenant, "bootstrap_demo")
        domain, _ = Domain.objects.get_or_create(
            name=settings.DEMO_DOMAIN,
            defaults={"tenant": tenant, "state": Domain.State.VERIFIED, "verified_at": timezone.now()},
        )
        if domain.tenant_id != tenant.pk:
            raise RuntimeError(f"DEMO_DOMAIN {domain.name} belongs to another tenant")
        mailbox = Mailbox.objects.filter(address=f"hello@{domain.name}").first() or mailbox_create(
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
    }


def login_tokens_purge(*, grace: timedelta = timedelta(days=1)) -> int:
    """Delete sign-in links that expired or were used more than ``grace`` ago; return how many.

    Only hashes are stored, so this is housekeeping, not security: a used or expired link is
    already refused. Idempotent, so running it twice (or on two workers) is harmless.
    """
    cutoff = timezone.now() - grace
    deleted, _ = LoginToken.objects.filter(Q(expires_at__lt=cutoff) | Q(used_at__lt=cutoff)).delete()
    return deleted
