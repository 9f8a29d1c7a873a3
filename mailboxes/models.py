"""Mailboxes: the addresses a tenant receives mail at."""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q
from django.utils import timezone


class MailboxQuerySet(models.QuerySet["Mailbox"]):
    def live(self) -> MailboxQuerySet:
        """Mailboxes that still receive mail (not past their expiry)."""
        return self.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))


class Mailbox(models.Model):
    class Kind(models.TextChoices):
        STANDARD = "standard", "Standard"
        TEMPORARY = "temporary", "Temporary"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Denormalized from the domain so every tenant-scoped query is one indexed filter.
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="mailboxes")
    domain = models.ForeignKey("tenants.Domain", on_delete=models.PROTECT, related_name="mailboxes")
    local_part = models.CharField(max_length=64)
    # local_part@domain, lowercase: the case-insensitive identity of the mailbox.
    address = models.CharField(max_length=320, unique=True)
    name = models.CharField(max_length=200, blank=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.STANDARD)
    is_catch_all = models.BooleanField(default=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    retention_days = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = MailboxQuerySet.as_manager()

    class Meta:
        verbose_name_plural = "mailboxes"
        ordering = ["address"]
        constraints = [
            models.UniqueConstraint(
                fields=["domain"], condition=Q(is_catch_all=True), name="mailbox_one_catch_all_per_domain"
            ),
        ]
        indexes = [
            models.Index(fields=["tenant", "-created_at"], name="mailbox_tenant_recent"),
            models.Index(fields=["expires_at"], name="mailbox_expiry", condition=Q(expires_at__isnull=False)),
        ]

    def __str__(self) -> str:
        return self.address
