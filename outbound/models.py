"""Outbound mail: DKIM keys per domain, messages to send with per-recipient state, suppressions."""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q
from django.utils import timezone


class DkimKey(models.Model):
    """A DKIM signing key of one domain (RFC 6376), published at ``<selector>._domainkey.<domain>``.

    Rotation keeps two selectors: a new key is ``pending`` until its TXT record is seen, then
    it becomes ``active`` (the one that signs) and the previous active key ``retired``: it
    stays published for signatures still in flight, and signs nothing more.
    """

    class Algorithm(models.TextChoices):
        RSA = "rsa", "RSA 2048 (rsa-sha256)"
        ED25519 = "ed25519", "Ed25519 (ed25519-sha256, RFC 8463)"

    class State(models.TextChoices):
        PENDING = "pending", "Pending: publish the TXT record"
        ACTIVE = "active", "Active: signs outgoing mail"
        RETIRED = "retired", "Retired: still published, signs nothing"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    domain = models.ForeignKey("tenants.Domain", on_delete=models.CASCADE, related_name="dkim_keys")
    selector = models.CharField(max_length=63)
    algorithm = models.CharField(max_length=8, choices=Algorithm.choices, default=Algorithm.RSA)
    # PEM (RSA, PKCS#8) or base64 seed (Ed25519), Fernet-encrypted (tenants.crypto).
    private_key_encrypted = models.TextField(editable=False)
    public_key = models.TextField(editable=False, help_text="The p= value of the TXT record (base64)")
    state = models.CharField(max_length=8, choices=State.choices, default=State.PENDING)
    published = models.BooleanField(default=False)
    last_checked_at = models.DateTimeField(null=True, blank=True)
    last_check_error = models.CharField(max_length=300, blank=True)
    activated_at = models.DateTimeField(null=True, blank=True)
    retired_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "DKIM key"
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["domain", "selector"], name="dkim_selector_per_domain"),
            models.UniqueConstraint(fields=["domain"], condition=Q(state="active"), name="dkim_one_active_per_domain"),
        ]

    def __str__(self) -> str:
        return f"{self.selector}._domainkey.{self.domain_id}"

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain.name}"

    @property
    def record_value(self) -> str:
        return f"v=DKIM1; k={self.algorithm}; p={self.public_key}"


class OutboundMessage(models.Model):
    """One message a tenant sends, durable before the API or submission answers.

    ``content`` is the message as composed (headers and body, CRLF); the DKIM signature is
    added over these final bytes by the delivery worker. ``mail_from`` is the VERP return path
    (``bounces+<id>@OUTBOUND_BOUNCE_DOMAIN``), so a DSN names the message it is about.
    """

    class Source(models.TextChoices):
        API = "api", "API"
        SUBMISSION = "submission", "SMTP submission"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    domain = models.ForeignKey("tenants.Domain", on_delete=models.CASCADE, related_name="+")
    # The sender's own mailbox, when From is one: the sent copy goes into its thread.
    mailbox = models.ForeignKey("mailboxes.Mailbox", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    source = models.CharField(max_length=12, choices=Source.choices, default=Source.API)
    from_address = models.CharField(max_length=320)
    mail_from = models.CharField(max_length=320, help_text="The envelope sender (VERP return path)")
    subject = models.CharField(max_length=998, blank=True)
    message_id = models.CharField(max_length=998, help_text="The Message-ID header")
    content = models.BinaryField(editable=False)
    size = models.PositiveIntegerField()
    actor_label = models.CharField(max_length=300, blank=True)
    sent_message = models.ForeignKey(
        "mailboxes.Message", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "-created_at"], name="outbound_tenant_recent")]

    def __str__(self) -> str:
        return f"{self.from_address}: {self.subject[:60]}"


class Recipient(models.Model):
    """One envelope recipient of an outbound message and where its delivery stands."""

    class State(models.TextChoices):
        QUEUED = "queued", "Queued"
        DEFERRED = "deferred", "Deferred (will retry)"
        DELIVERED = "delivered", "Delivered"
        BOUNCED = "bounced", "Bounced"
        SUPPRESSED = "suppressed", "Suppressed (not sent)"

    PENDING_STATES = (State.QUEUED, State.DEFERRED)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    message = models.ForeignKey(OutboundMessage, on_delete=models.CASCADE, related_name="recipients")
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    address = models.CharField(max_length=320)
    state = models.CharField(max_length=10, choices=State.choices, default=State.QUEUED)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    # A worker's claim: until then no other worker takes this recipient (a dead worker's claim
    # simply runs out, and the sweeper hands the recipient to another).
    claimed_until = models.DateTimeField(null=True, blank=True)
    give_up_at = models.DateTimeField()
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    last_response = models.CharField(max_length=1000, blank=True)
    remote_host = models.CharField(max_length=255, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    bounced_at = models.DateTimeField(null=True, blank=True)
    dkim_selector = models.CharField(max_length=63, blank=True)

    class Meta:
        ordering = ["address"]
        indexes = [
            models.Index(
                fields=["next_attempt_at"], name="outbound_recipient_due", condition=Q(state__in=["queued", "deferred"])
            ),
            models.Index(fields=["tenant", "address"], name="outbound_recipient_address"),
        ]

    def __str__(self) -> str:
        return f"{self.address} ({self.state})"


class Suppression(models.Model):
    """An address this tenant sends nothing to: a hard bounce, a complaint, or added by hand."""

    class Reason(models.TextChoices):
        HARD_BOUNCE = "hard_bounce", "Hard bounce"
        COMPLAINT = "complaint", "Complaint"
        MANUAL = "manual", "Added by hand"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    address = models.CharField(max_length=320, help_text="Lowercase")
    reason = models.CharField(max_length=12, choices=Reason.choices, default=Reason.MANUAL)
    detail = models.CharField(max_length=1000, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["tenant", "address"], name="suppression_once_per_tenant")]

    def __str__(self) -> str:
        return self.address


class SendCounter(models.Model):
    """What a tenant sent in one minute or one UTC day: the rate limit and the daily quota.

    One row per tenant and window, bumped by the send's own transaction with one
    ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` (outbound/services.py), so a refused
    send counts nothing and every web process and submission server reads the same numbers.
    """

    class Period(models.TextChoices):
        MINUTE = "minute", "Minute"
        DAY = "day", "Day (UTC)"

    id = models.BigAutoField(primary_key=True)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    period = models.CharField(max_length=6, choices=Period.choices)
    start = models.DateTimeField()
    messages = models.PositiveIntegerField(default=0)
    recipients = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "period", "start"], name="send_counter_once_per_window")
        ]
        indexes = [models.Index(fields=["start"], name="send_counter_start")]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.period} {self.start:%Y-%m-%d %H:%M}: {self.messages}"


class DomainSending(models.Model):
    """How a domain sends: by default only as its live mailboxes; with ``any_local_part``
    any address of the domain may be the From (``noreply@``, ``billing@``...), by a key that
    holds the whole domain (never by a key granted only some of its mailboxes)."""

    domain = models.OneToOneField(
        "tenants.Domain", on_delete=models.CASCADE, primary_key=True, related_name="outbound_sending"
    )
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    any_local_part = models.BooleanField(
        default=False, help_text="Any address of the domain may send, not only its mailboxes"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "domain sending policy"

    def __str__(self) -> str:
        return f"{self.domain_id}: any local part {'allowed' if self.any_local_part else 'refused'}"
