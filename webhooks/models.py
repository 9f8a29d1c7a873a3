"""Webhook endpoints, the deliveries fanned out to them from the event log, and each attempt.

The database is the source of truth for what is pending: a Delivery row says what must be
sent, when, and who (which claim) is sending it right now.
"""

from __future__ import annotations

import uuid

from django.db import models


class Endpoint(models.Model):
    """A tenant's receiver URL with its filters and signing secrets (encrypted at rest)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="webhook_endpoints")
    url = models.URLField(max_length=2000)
    description = models.CharField(max_length=500, blank=True)
    # Exact types ("ingest.received") or prefixes ("message.*"); empty means every type
    # except webhook.* (those must be asked for by name, see services.endpoint_matches).
    event_types = models.JSONField(default=list, blank=True)
    # Optional narrowing to some domains or mailboxes of the tenant (ids as strings).
    domain_ids = models.JSONField(default=list, blank=True)
    mailbox_ids = models.JSONField(default=list, blank=True)
    enabled = models.BooleanField(default=True)
    disabled_reason = models.CharField(max_length=500, blank=True)
    disabled_at = models.DateTimeField(null=True, blank=True)
    # Start of the current run of failed attempts; None after any success.
    failing_since = models.DateTimeField(null=True, blank=True)
    # Fernet tokens of the signing secrets; never shown after creation or rotation.
    secret_encrypted = models.TextField(editable=False)
    previous_secret_encrypted = models.TextField(blank=True, editable=False)
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True, editable=False)
    secret_rotated_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "enabled"], name="webhook_endpoint_tenant")]

    def __str__(self) -> str:
        return f"{self.host} ({self.pk})"

    @property
    def host(self) -> str:
        """The URL's host, for display where the full URL (which may carry a token) must not go."""
        from urllib.parse import urlsplit

        return urlsplit(self.url).hostname or ""


class Delivery(models.Model):
    """One event owed to one endpoint."""

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        SENDING = "sending", "Sending"
        DELIVERED = "delivered", "Delivered"
        DEAD = "dead", "Dead"

    class Origin(models.TextChoices):
        FANOUT = "fanout", "Fan-out"
        RETRY = "retry", "Manual retry"
        REPLAY = "replay", "Replay"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="webhook_deliveries")
    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="deliveries")
    event = models.ForeignKey("audit.Event", on_delete=models.CASCADE, related_name="webhook_deliveries")
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    origin = models.CharField(max_length=16, choices=Origin.choices, default=Origin.FANOUT)
    # Attempts claimed in the current cycle (a retry or replay starts a new cycle).
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    # Who is sending it (state SENDING) and until when the claim holds.
    claim = models.CharField(max_length=32, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    last_status = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "deliveries"
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["endpoint", "event"], name="webhook_delivery_once")]
        indexes = [
            models.Index(fields=["state", "next_attempt_at"], name="webhook_delivery_due"),
            models.Index(fields=["endpoint", "state", "-created_at"], name="webhook_delivery_endpoint"),
            models.Index(fields=["event"], name="webhook_delivery_event"),
        ]

    def __str__(self) -> str:
        return f"{self.event_id} -> {self.endpoint_id} ({self.state})"


class Attempt(models.Model):
    """One HTTP request of a delivery, successful or not."""

    id = models.BigAutoField(primary_key=True)
    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="attempt_log")
    number = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    duration_ms = models.PositiveIntegerField(default=0)
    status_code = models.PositiveIntegerField(null=True, blank=True)
    response_body = models.CharField(max_length=1024, blank=True)
    error = models.CharField(max_length=500, blank=True)
    succeeded = models.BooleanField(default=False)

    class Meta:
        ordering = ["delivery", "id"]

    def __str__(self) -> str:
        return f"attempt {self.number} of {self.delivery_id}: {self.status_code or self.error}"
