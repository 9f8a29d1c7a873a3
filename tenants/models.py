"""The tenant hierarchy: users, tenants, their domains, memberships and API keys."""

from __future__ import annotations

import secrets
import uuid
from typing import Any, ClassVar

from django.contrib.auth.base_user import AbstractBaseUser, BaseUserManager
from django.contrib.auth.models import PermissionsMixin
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone


class UserManager(BaseUserManager["User"]):
    use_in_migrations = True

    def _create(self, email: str, password: str | None, **fields: Any) -> User:
        if not email:
            raise ValueError("A user needs an e-mail address")
        user = self.model(email=self.normalize_email(email).lower(), **fields)
        if password:
            user.set_password(password)
        else:
            user.set_unusable_password()
        user.full_clean(exclude=["password"])
        user.save(using=self._db)
        return user

    def create_user(self, email: str, password: str | None = None, **fields: Any) -> User:
        fields.setdefault("is_staff", False)
        fields.setdefault("is_superuser", False)
        return self._create(email, password, **fields)

    def create_superuser(self, email: str, password: str | None = None, **fields: Any) -> User:
        fields["is_staff"] = True
        fields["is_superuser"] = True
        return self._create(email, password, **fields)


class User(AbstractBaseUser, PermissionsMixin):
    """A person. Identified by e-mail; signs in by magic link or SSO, staff also by password."""

    email = models.EmailField(max_length=254, unique=True)
    name = models.CharField(max_length=200, blank=True)
    is_active = models.BooleanField(default=True)
    is_staff = models.BooleanField(default=False)
    date_joined = models.DateTimeField(default=timezone.now)

    objects = UserManager()

    USERNAME_FIELD = "email"
    EMAIL_FIELD = "email"
    REQUIRED_FIELDS: ClassVar[list[str]] = []

    class Meta:
        constraints = [models.UniqueConstraint(Lower("email"), name="user_email_ci_unique")]

    def __str__(self) -> str:
        return self.email


class AntivirusMode(models.TextChoices):
    """What happens to mail clamd finds infected (mailboxes/antivirus.py, ingest/smtp.py)."""

    OFF = "off", "Not scanned"
    TAG = "tag", "Accepted, tagged virus"
    QUARANTINE = "quarantine", "Accepted, quarantined"
    REJECT = "reject", "Refused before the 250 (554 5.7.1)"


class Tenant(models.Model):
    class Plan(models.TextChoices):
        DEVELOPER = "developer", "Developer"
        TEMPORARY = "temporary", "Temporary inboxes"
        ENTERPRISE = "enterprise", "Enterprise"

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        SUSPENDED = "suspended", "Suspended"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    slug = models.SlugField(max_length=63, unique=True)
    name = models.CharField(max_length=200)
    plan = models.CharField(max_length=16, choices=Plan.choices, default=Plan.DEVELOPER)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    status_reason = models.CharField(max_length=500, blank=True)
    # Per-tenant overrides; None means the platform default.
    max_message_size = models.PositiveIntegerField(null=True, blank=True)
    retention_days = models.PositiveIntegerField(null=True, blank=True)
    # Antivirus (clamd): empty is the platform's ANTIVIRUS_MODE; a domain may override it.
    antivirus_mode = models.CharField(max_length=16, choices=AntivirusMode.choices, blank=True)
    # CIDRs allowed to reach the control plane (console and this tenant's API keys); empty: anywhere.
    ip_allowlist = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_active(self) -> bool:
        return self.status == self.Status.ACTIVE


def domain_verification_token() -> str:
    return secrets.token_urlsafe(24)


class Domain(models.Model):
    """A mail domain owned by exactly one tenant."""

    class State(models.TextChoices):
        PENDING = "pending", "Pending verification"
        VERIFIED = "verified", "Verified"
        MX_LOST = "mx_lost", "MX lost"
        SUSPENDED = "suspended", "Suspended"

    class RecipientPolicy(models.TextChoices):
        REJECT = "reject", "Reject unknown recipients"
        DROP = "drop", "Accept and drop unknown recipients"
        CATCH_ALL = "catch_all", "Deliver unknown recipients to the catch-all mailbox"

    # States in which a name belongs to its tenant: at most one row per name among them.
    # Pending rows only claim an intent, so several tenants may hold the same pending name;
    # the first to verify wins (tenants.services.domain_check).
    CLAIMED_STATES = (State.VERIFIED, State.MX_LOST, State.SUSPENDED)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="domains")
    # Stored lowercase, IDNA (A-label) form, so uniqueness is case-insensitive.
    name = models.CharField(max_length=253)
    # A domain the platform itself serves (the demo domain, TEMP_INBOX_DOMAIN): its DNS is
    # not the tenant's to prove, so the domain checks leave it alone.
    platform_managed = models.BooleanField(default=False)
    recipient_policy = models.CharField(max_length=16, choices=RecipientPolicy.choices, default=RecipientPolicy.REJECT)
    # Antivirus (clamd): empty is the tenant's mode.
    antivirus_mode = models.CharField(max_length=16, choices=AntivirusMode.choices, blank=True)
    # Refuse at DATA (550 5.7.1) SMTP mail that fails DMARC while its From domain publishes
    # p=reject (RFC 7489 section 6.6.4; section 10.3: forwarded and list mail may fail). A DNS
    # failure during that check defers (451 4.7.0), never refuses.
    dmarc_reject = models.BooleanField(default=False)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    state_reason = models.CharField(max_length=500, blank=True)
    verification_token = models.CharField(max_length=64, default=domain_verification_token)
    verified_at = models.DateTimeField(null=True, blank=True)
    # The last DNS check: whether the TXT record and the MX records were in place.
    last_checked_at = models.DateTimeField(null=True, blank=True)
    txt_ok = models.BooleanField(default=False)
    mx_ok = models.BooleanField(default=False)
    last_check_error = models.CharField(max_length=300, blank=True)
    mx_lost_at = models.DateTimeField(null=True, blank=True)
    suspended_at = models.DateTimeField(null=True, blank=True)
    # The current streak of failed checks of a claimed domain (records gone, MX elsewhere):
    # one failed look-up never suspends a domain, a confirmed streak does. Reset by a good check.
    failed_checks = models.PositiveIntegerField(default=0)
    failing_since = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        indexes = [
            models.Index(fields=["tenant", "name"], name="domain_tenant_name"),
            models.Index(fields=["name"], name="domain_name"),
        ]
        constraints = [
            # A partial unique index (PostgreSQL and SQLite both have them): one owner per
            # claimed name, any number of pending claims, one per tenant.
            models.UniqueConstraint(
                fields=["name"],
                condition=models.Q(state__in=["verified", "mx_lost", "suspended"]),
                name="domain_name_claimed_unique",
            ),
            models.UniqueConstraint(fields=["tenant", "name"], name="domain_tenant_name_unique"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def verification_record(self) -> str:
        return f"mailplatform-verification={self.verification_token}"


class Membership(models.Model):
    class Role(models.TextChoices):
        OWNER = "owner", "Owner"
        ADMIN = "admin", "Admin"
        MEMBER = "member", "Member"
        VIEWER = "viewer", "Viewer"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "tenant"], name="membership_unique")]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} as {self.role}"


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def active(self) -> ApiKeyQuerySet:
        now = timezone.now()
        return self.filter(revoked_at__isnull=True).exclude(expires_at__lte=now)


class ApiKey(models.Model):
    """A tenant's API key. The secret is shown once; only a keyed hash is stored.

    Permissions are a list of names from ``tenants.access.Permission``. The resource
    allow-list is the union of ``allowed_domains``, ``allowed_mailboxes`` and ``allowed_pools``;
    a key minted with all three empty is for the whole tenant (``scoped`` false).
    ``allowed_mailboxes`` names ``mailboxes.Mailbox`` by label, as audit does with Tenant, so
    this app never imports the one above it.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=200)
    prefix = models.CharField(max_length=8, db_index=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    last_four = models.CharField(max_length=4, editable=False)
    permissions = models.JSONField(default=list)
    allowed_domains = models.ManyToManyField(Domain, blank=True, related_name="+")
    allowed_mailboxes = models.ManyToManyField("mailboxes.Mailbox", blank=True, related_name="+")
    allowed_pools = models.ManyToManyField("mailboxes.MailboxPool", blank=True, related_name="+")
    # Minted with an allow-list. Deleting a granted resource deletes its row of the list; a
    # key whose list has emptied that way reaches nothing, never the whole tenant.
    scoped = models.BooleanField(default=False, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    last_used_ip = models.GenericIPAddressField(null=True, blank=True)
    # A narrower CIDR list for this key alone, on top of the tenant's.
    ip_allowlist = models.JSONField(default=list, blank=True)
    # Recent client addresses, so use from a new one is audited once.
    known_ips = models.JSONField(default=list, blank=True, editable=False)
    # The key that minted this one: the child is never wider than it and dies with it
    # (revoked together, refused once any ancestor is revoked or expired).
    parent = models.ForeignKey(
        "self", on_delete=models.CASCADE, null=True, blank=True, related_name="children", editable=False
    )
    created_by = models.ForeignKey(User, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} (mp_…{self.last_four})"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def is_expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

    def ancestors(self) -> list[ApiKey]:
        """The keys above this one, nearest first (cached on the instance)."""
        cached: list[ApiKey] | None = getattr(self, "_ancestors", None)
        if cached is None:
            cached, seen, parent_id = [], {self.pk}, self.parent_id
            while parent_id is not None and parent_id not in seen:  # a cycle cannot be minted; be safe anyway
                parent = ApiKey.objects.filter(pk=parent_id).first()
                if parent is None:
                    break
                cached.append(parent)
                seen.add(parent.pk)
                parent_id = parent.parent_id
            self._ancestors = cached
        return cached


class SsoProvider(models.Model):
    """A tenant's own OpenID Connect provider (enterprise plan).

    Addresses on its claimed e-mail domains (SsoDomain) sign in through it; with
    ``require_sso`` they cannot use magic links. The client secret is stored encrypted (tenants.crypto). The discovery
    document is cached with its fetch time.
    """

    class Role(models.TextChoices):
        ADMIN = "admin", "Admin"
        MEMBER = "member", "Member"
        VIEWER = "viewer", "Viewer"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="sso_provider")
    issuer = models.URLField(max_length=500)
    client_id = models.CharField(max_length=255)
    client_secret_encrypted = models.TextField(editable=False)
    scopes = models.CharField(max_length=255, default="openid email profile")
    default_role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    # Optional: the claim holding group names (e.g. "groups") and group -> role.
    role_claim = models.CharField(max_length=100, blank=True)
    role_mapping = models.JSONField(default=dict, blank=True)
    require_sso = models.BooleanField(default=False)
    enabled = models.BooleanField(default=True)
    discovery = models.JSONField(default=dict, blank=True, editable=False)
    discovery_fetched_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "SSO provider"

    def __str__(self) -> str:
        return f"{self.tenant}: {self.issuer}"

    @property
    def email_domains(self) -> list[str]:
        return sorted(self.domains.values_list("name", flat=True))  # type: ignore[attr-defined]


class SsoDomain(models.Model):
    """An e-mail domain whose people sign in through one tenant's provider (one tenant each)."""

    name = models.CharField(max_length=253, unique=True)
    provider = models.ForeignKey(SsoProvider, on_delete=models.CASCADE, related_name="domains")

    class Meta:
        verbose_name = "SSO e-mail domain"

    def __str__(self) -> str:
        return self.name
