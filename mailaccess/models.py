"""App passwords: a per-mailbox credential for mail clients (IMAP and POP3)."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class AppPassword(models.Model):
    """A password a member made for one mailbox, to type into Thunderbird or mutt.

    Shaped like an API key (``mpa_`` + random + checksum, tenants/keys.py): only a keyed
    hash is stored, with an 8-character lookup prefix and the last four for display. It
    reads that mailbox and, with ``can_write``, changes flags and deletes (EXPUNGE, DELE).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="app_passwords")
    mailbox = models.ForeignKey("mailboxes.Mailbox", on_delete=models.CASCADE, related_name="app_passwords")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=8, db_index=True)
    secret_hash = models.CharField(max_length=64)
    last_four = models.CharField(max_length=4)
    can_write = models.BooleanField(default=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["mailbox", "-created_at"], name="app_password_mailbox")]

    def __str__(self) -> str:
        return f"{self.name} (mpa_…{self.last_four})"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None
