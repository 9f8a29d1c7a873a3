from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class LoginToken(models.Model):
    """A single-use sign-in link. Only the SHA-256 of the token is stored."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    token_hash = models.CharField(max_length=64, unique=True)
    # SHA-256 of the cookie set on the browser that asked for the link; empty for links the
    # platform mints itself (bootstrap_demo, invitations), which any browser may open once.
    binding_hash = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"login link for {self.user}"


class TempInbox(models.Model):
    """The credential of a temporary inbox: only the SHA-256 of its link token is stored.

    The mailbox (kind temporary, in the platform's temporary tenant) carries the expiry; when
    the retention sweeper removes the mailbox, this row goes with it.
    """

    mailbox = models.OneToOneField("mailboxes.Mailbox", on_delete=models.CASCADE, related_name="temp_inbox")
    token_hash = models.CharField(max_length=64, unique=True)
    extensions = models.PositiveSmallIntegerField(default=0)
    created_ip = models.GenericIPAddressField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"temporary inbox {self.mailbox_id}"


class SessionGeneration(models.Model):
    """Per-user counter; "sign out everywhere" increments it (see webinbox.middleware)."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    generation = models.PositiveIntegerField(default=0)
    changed_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"session generation {self.generation} of {self.user_id}"
