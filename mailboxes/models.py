"""Mailboxes: the addresses a tenant receives mail at."""

from __future__ import annotations

import uuid

from django.contrib.postgres.search import SearchVectorField
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
    # local_part@domain, lowercase. Unique per domain row, not globally: several tenants may
    # hold the same domain name pending (tenants.models.Domain), and a squatter's mailbox on
    # its pending row must not keep the owner from creating that address once it verifies.
    address = models.CharField(max_length=320, db_index=True)
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
            models.UniqueConstraint(fields=["domain", "local_part"], name="mailbox_unique_per_domain"),
        ]
        indexes = [
            models.Index(fields=["tenant", "-created_at"], name="mailbox_tenant_recent"),
            models.Index(fields=["expires_at"], name="mailbox_expiry", condition=Q(expires_at__isnull=False)),
        ]

    def __str__(self) -> str:
        return self.address


class Message(models.Model):
    """One received message in one mailbox.

    The raw bytes live in blob storage under ``storage_key`` (content-addressed, shared by
    every mailbox of the same tenant that received the same delivery). The envelope fields
    are what the SMTP client said (RFC 5321 section 4.1.1), not what the headers claim.
    ``trace_id`` is the SMTP queue id; with the mailbox it makes a re-drain of the same spool
    entry idempotent.
    """

    class State(models.TextChoices):
        STORED = "stored", "Stored"
        PARSED = "parsed", "Parsed"
        INDEXED = "indexed", "Indexed"
        QUARANTINED = "quarantined", "Quarantined"
        DELETED = "deleted", "Deleted"

    class Source(models.TextChoices):
        SMTP = "smtp", "SMTP"
        LMTP = "lmtp", "LMTP"
        API = "api", "API upload"
        IMAP = "imap", "IMAP pull"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="messages")
    # SET_NULL, not CASCADE: deleting a mailbox soft-deletes its mail, and the rows must outlive
    # the mailbox until the purge sweeper has removed their blobs (mailboxes/retention.py).
    mailbox = models.ForeignKey(Mailbox, on_delete=models.SET_NULL, null=True, related_name="messages")
    state = models.CharField(max_length=16, choices=State.choices, default=State.STORED)
    state_changed_at = models.DateTimeField(default=timezone.now)
    state_reason = models.CharField(max_length=500, blank=True)
    source = models.CharField(max_length=8, choices=Source.choices, default=Source.SMTP)
    # Envelope (RFC 5321): reverse-path may be empty (the null sender "<>", section 4.5.5).
    mail_from = models.CharField(max_length=320, blank=True)
    rcpt = models.CharField(max_length=320, help_text="The recipient address as the client sent it")
    tags = models.JSONField(default=list, blank=True, help_text="From plus-addressing: box+tag@domain")
    remote_ip = models.GenericIPAddressField(null=True, blank=True)
    helo = models.CharField(max_length=255, blank=True)
    tls = models.BooleanField(default=False)
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    storage_key = models.CharField(max_length=512)
    trace_id = models.CharField(max_length=64, help_text="The SMTP queue id")
    received_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    # --- Parsed content (mailboxes/parse.py). Empty until the message is parsed. ---------
    subject = models.CharField(max_length=998, blank=True)  # RFC 5322 section 2.1.1 line limit
    from_address = models.CharField(max_length=320, blank=True)
    from_name = models.CharField(max_length=320, blank=True)
    # Lists of {"name": ..., "address": ...}.
    to = models.JSONField(default=list, blank=True)
    cc = models.JSONField(default=list, blank=True)
    reply_to = models.JSONField(default=list, blank=True)
    sender = models.CharField(max_length=320, blank=True)
    # To, Cc and the envelope recipient in one string: what ``to:`` searches.
    recipients_text = models.TextField(blank=True)
    date = models.DateTimeField(null=True, blank=True, help_text="The Date header, if it parses")
    message_id = models.CharField(max_length=998, blank=True)
    in_reply_to = models.CharField(max_length=998, blank=True)
    references = models.JSONField(default=list, blank=True)
    thread_id = models.CharField(max_length=64, blank=True)
    # Every header field in order, as [name, decoded value] pairs (RFC 5322 section 2.2).
    headers = models.JSONField(default=list, blank=True)
    text = models.TextField(blank=True)
    html = models.TextField(blank=True, help_text="Sanitized; remote images blocked, cid: kept for rewriting")
    stripped_text = models.TextField(blank=True, help_text="The new part of a reply, without quotes or signature")
    codes = models.JSONField(default=list, blank=True)
    links = models.JSONField(default=list, blank=True)
    authentication_results = models.TextField(blank=True)  # RFC 8601
    received_spf = models.TextField(blank=True)  # RFC 7208 section 9.1
    has_attachments = models.BooleanField(default=False)
    attachment_names = models.TextField(blank=True)
    defects = models.JSONField(default=list, blank=True)
    is_read = models.BooleanField(default=False)
    parsed_at = models.DateTimeField(null=True, blank=True)
    indexed_at = models.DateTimeField(null=True, blank=True)
    deleted_at = models.DateTimeField(null=True, blank=True)
    # When the blobs of a deleted message are gone (the row stays as a tombstone).
    purged_at = models.DateTimeField(null=True, blank=True)
    # PostgreSQL full-text document (weights: A subject, B addresses, C body and attachment
    # names); maintained by the index task, unused on SQLite. GIN index in migration 0004.
    search_vector = SearchVectorField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-received_at"]
        constraints = [
            models.UniqueConstraint(fields=["mailbox", "trace_id"], name="message_once_per_delivery"),
        ]
        indexes = [
            models.Index(fields=["mailbox", "-received_at"], name="message_mailbox_recent"),
            models.Index(fields=["mailbox", "-created_at"], name="message_mailbox_created"),
            models.Index(fields=["tenant", "-created_at"], name="message_tenant_recent"),
            models.Index(fields=["state", "state_changed_at"], name="message_state_age"),
            models.Index(fields=["sha256"], name="message_sha256"),
            # The drainer's "already drained?" lookup and tracing by queue id: the unique
            # (mailbox, trace_id) index cannot serve a lookup by trace_id alone.
            models.Index(fields=["trace_id"], name="message_trace"),
            models.Index(fields=["tenant", "-received_at", "-id"], name="message_tenant_received"),
            models.Index(fields=["mailbox", "-received_at", "-id"], name="message_mailbox_received_id"),
            models.Index(fields=["mailbox", "thread_id"], name="message_mailbox_thread"),
            models.Index(fields=["mailbox", "message_id"], name="message_mailbox_msgid"),
            models.Index(fields=["deleted_at"], name="message_deleted", condition=Q(purged_at__isnull=True)),
        ]

    def __str__(self) -> str:
        return f"{self.trace_id} -> {self.rcpt}"

    @property
    def from_entry(self) -> dict[str, str]:
        return {"name": self.from_name, "address": self.from_address}


class Attachment(models.Model):
    """One attachment or inline part of a message, stored as its own object.

    Keys are content-addressed per tenant (``att/<tenant>/<sha256>``), so the same file in
    many messages is stored once; ``content_id`` (RFC 2392) lets ``cid:`` URLs in the HTML
    body point at it.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="attachments")
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="attachments")
    position = models.PositiveIntegerField(default=0)
    filename = models.CharField(max_length=255, blank=True)
    content_type = models.CharField(max_length=255, blank=True)
    size = models.PositiveBigIntegerField(default=0)
    sha256 = models.CharField(max_length=64)
    content_id = models.CharField(max_length=255, blank=True)
    is_inline = models.BooleanField(default=False)
    storage_key = models.CharField(max_length=512)

    class Meta:
        ordering = ["message", "position"]
        constraints = [
            models.UniqueConstraint(fields=["message", "position"], name="attachment_once_per_position"),
        ]
        indexes = [models.Index(fields=["sha256"], name="attachment_sha256")]

    def __str__(self) -> str:
        return self.filename or self.sha256[:12]
