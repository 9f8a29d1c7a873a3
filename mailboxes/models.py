"""Mailboxes: the addresses a tenant receives mail at."""

from __future__ import annotations

import time
import uuid

from django.contrib.postgres.search import SearchVectorField
from django.db import models
from django.db.models import Q
from django.utils import timezone


class MailboxQuerySet(models.QuerySet["Mailbox"]):
    def live(self) -> MailboxQuerySet:
        """Mailboxes that still receive mail (not past their expiry)."""
        return self.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))


def uid_validity_new() -> int:
    """A fresh IMAP UIDVALIDITY (RFC 3501 section 2.3.1.1): non-zero, 32 bits, never reused."""
    return int(time.time()) & 0x7FFFFFFF or 1


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
    # IMAP/POP3 (mailaccess): the next per-mailbox message UID, taken with
    # UPDATE ... RETURNING in the transaction that creates the Message rows
    # (mailboxes.services.mailbox_uids_take), and the UIDVALIDITY those UIDs belong to.
    uid_next = models.PositiveBigIntegerField(default=1, editable=False)
    uid_validity = models.PositiveBigIntegerField(default=uid_validity_new, editable=False)

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


class AntivirusVerdict(models.TextChoices):
    """A message's scan: empty until scanned, or when its mode is off."""

    NOT_SCANNED = "", "Not scanned"
    CLEAN = "clean", "Clean"
    INFECTED = "infected", "Infected"
    # clamd could not be asked (down, timed out): accepted fail-open, rescanned by the sweeper.
    ERROR = "error", "Scan failed, rescan due"
    TOO_LARGE = "too_large", "Larger than the scanner takes"


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
    # Our own Authentication-Results value (RFC 8601, authserv-id SMTP_HOSTNAME), never the sender's.
    authentication_results = models.TextField(blank=True)
    received_spf = models.TextField(blank=True)  # RFC 7208 section 9.1
    # --- Trust verdicts (mailboxes/authentication.py): SPF, DKIM, DMARC, ARC verified by us. ---
    # One RFC 8601 result word each, for search ("" until verified; SPF also "" without a
    # connecting IP of the original sender: LMTP, API upload, IMAP pull); the whole verdict
    # (per DKIM signature, DMARC policy and alignment, the ARC chain) in ``authentication``.
    auth_spf = models.CharField(max_length=16, blank=True)
    auth_dkim = models.CharField(max_length=16, blank=True)
    auth_dmarc = models.CharField(max_length=16, blank=True)
    auth_arc = models.CharField(max_length=16, blank=True)
    authentication = models.JSONField(null=True, blank=True)
    # When a verdict with a temperror (DNS timeout, SERVFAIL) is verified again; null once it
    # has none or its re-checks are used up (authentication.RECHECK_DELAYS).
    auth_recheck_at = models.DateTimeField(null=True, blank=True)
    has_attachments = models.BooleanField(default=False)
    attachment_names = models.TextField(blank=True)
    defects = models.JSONField(default=list, blank=True)
    # --- Antivirus (clamd; mailboxes/antivirus.py). ----------------------------------------
    antivirus_verdict = models.CharField(max_length=16, choices=AntivirusVerdict.choices, blank=True)
    antivirus_signature = models.CharField(max_length=255, blank=True, help_text="What clamd found")
    antivirus_scanned_at = models.DateTimeField(null=True, blank=True)
    is_read = models.BooleanField(default=False)
    # IMAP's \Deleted flag (RFC 3501 section 2.3.2): marked, not yet expunged; every session
    # sees it and the next EXPUNGE or CLOSE in any session removes the message.
    imap_deleted = models.BooleanField(default=False)
    # The copy IMAP and POP3 serve, when it was fixed without our verdict's ``presented``:
    # for a message stuck unparsed past mailboxes.presentation.UNVERIFIED_SHOWN_AFTER, and
    # with AUTH_VERIFY off (the fields claiming our authserv-id left out, nothing put first).
    # Once set it wins over the verdict's: a client's copy never changes under its UID.
    imap_presentation = models.JSONField(null=True, blank=True, editable=False)
    # A copy of mail the tenant sent (outbound/sent.py): shown in its thread, found by in:sent.
    is_sent = models.BooleanField(default=False)
    # The IMAP UID within the mailbox (RFC 3501 section 2.3.1.1): strictly ascending in the
    # order messages become visible, never reused.
    uid = models.PositiveBigIntegerField(null=True, blank=True, editable=False)
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
            models.UniqueConstraint(fields=["mailbox", "uid"], name="message_uid_per_mailbox"),
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
            models.Index(
                fields=["antivirus_scanned_at"], name="message_rescan_due", condition=Q(antivirus_verdict="error")
            ),
            models.Index(
                fields=["auth_recheck_at"], name="message_auth_recheck_due", condition=Q(auth_recheck_at__isnull=False)
            ),
            # The lowest UID of a mailbox still awaiting its parse: IMAP and POP3 show only the
            # messages below it (mailaccess.store.visible). Small: it holds only unparsed mail.
            models.Index(
                fields=["mailbox", "uid"],
                name="message_uid_unsettled",
                condition=Q(state="stored", imap_presentation__isnull=True),
            ),
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


# --- Mailbox pools and account bindings (mailboxes/bindings/) -------------------------------
class AccountProvider(models.Model):
    """A provider the tenant's external accounts sign up with (``google``, ``github``...), and
    how its verification mail is recognised: sender domains (the From address's domain or a
    subdomain of it) and subject patterns (case-insensitive regular expressions). In a shared
    mailbox, a code is attributed to the binding whose provider matches the message."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="account_providers")
    name = models.CharField(max_length=40)
    sender_domains = models.JSONField(default=list, blank=True)
    subject_patterns = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="account_provider_unique_name")]

    def __str__(self) -> str:
        return self.name


class MailboxPool(models.Model):
    """A named set of mailboxes of one tenant on one domain, handed out to external accounts.

    ``policy`` decides which mailbox a new account gets: ``least_bound`` the one with the
    fewest accounts, ``dedicated`` a mailbox of its own, ``shared`` the fullest one that still
    has room (packing). ``one_per_provider`` keeps two accounts of the same provider out of one
    mailbox (a partial unique index on AccountBinding enforces it). With ``auto_provision``,
    mailboxes with random local parts are added when the free capacity falls below
    ``provision_threshold``, up to ``max_mailboxes``.
    """

    class Policy(models.TextChoices):
        LEAST_BOUND = "least_bound", "Least bound"
        DEDICATED = "dedicated", "Dedicated"
        SHARED = "shared", "Shared"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="mailbox_pools")
    domain = models.ForeignKey("tenants.Domain", on_delete=models.PROTECT, related_name="mailbox_pools")
    name = models.CharField(max_length=100)
    policy = models.CharField(max_length=16, choices=Policy.choices, default=Policy.LEAST_BOUND)
    max_bindings_per_mailbox = models.PositiveIntegerField(default=10)
    one_per_provider = models.BooleanField(default=True)
    auto_provision = models.BooleanField(default=False)
    provision_threshold = models.PositiveIntegerField(default=5, help_text="Free places that trigger provisioning")
    provision_batch = models.PositiveIntegerField(default=10)
    max_mailboxes = models.PositiveIntegerField(default=100)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="mailbox_pool_unique_name")]

    def __str__(self) -> str:
        return self.name

    @property
    def capacity_per_mailbox(self) -> int:
        return 1 if self.policy == self.Policy.DEDICATED else max(1, self.max_bindings_per_mailbox)


class PoolMailbox(models.Model):
    """A mailbox's place in a pool (a mailbox is in one pool at most), with its count of
    active bindings: the row allocation locks, so the count and the policy hold together."""

    id = models.BigAutoField(primary_key=True)
    pool = models.ForeignKey(MailboxPool, on_delete=models.CASCADE, related_name="members")
    mailbox = models.OneToOneField(Mailbox, on_delete=models.CASCADE, related_name="pool_member")
    active_bindings = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["pool", "active_bindings", "id"], name="pool_member_load")]

    def __str__(self) -> str:
        return f"{self.mailbox_id} in {self.pool_id}"


class AccountBinding(models.Model):
    """One external account of the host (``account_ref``) bound to one mailbox of a pool.

    The ``link`` (``mpl_`` + random + checksum, tenants/keys.py) is shown to the host once;
    only its lookup prefix and keyed hash are kept. An account has at most one active binding
    (partial unique index). Reassigning ends this binding (``ended_reason = reassigned``,
    ``successor``) and hands the link to the new one; releasing ends it and the link with it.
    """

    class EndedReason(models.TextChoices):
        RELEASED = "released", "Released"
        REASSIGNED = "reassigned", "Reassigned"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="account_bindings")
    pool = models.ForeignKey(MailboxPool, on_delete=models.CASCADE, related_name="bindings")
    mailbox = models.ForeignKey(Mailbox, on_delete=models.CASCADE, related_name="account_bindings")
    account_ref = models.CharField(max_length=200)
    provider = models.CharField(max_length=40)
    # Set when the pool keeps one account per provider in a mailbox: the index below holds it.
    provider_exclusive = models.BooleanField(default=True, editable=False)
    label = models.CharField(max_length=200, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    active = models.BooleanField(default=True)
    link_prefix = models.CharField(max_length=8, blank=True, editable=False)
    link_hash = models.CharField(max_length=64, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    released_at = models.DateTimeField(null=True, blank=True)
    ended_reason = models.CharField(max_length=16, choices=EndedReason.choices, blank=True)
    successor = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "account_ref"], condition=Q(active=True), name="binding_one_active_per_account"
            ),
            models.UniqueConstraint(
                fields=["mailbox", "provider"],
                condition=Q(active=True, provider_exclusive=True),
                name="binding_one_provider_per_mailbox",
            ),
            models.UniqueConstraint(fields=["link_hash"], condition=~Q(link_hash=""), name="binding_link_unique"),
        ]
        indexes = [
            models.Index(fields=["link_prefix"], name="binding_link_prefix", condition=~Q(link_prefix="")),
            models.Index(fields=["mailbox", "active"], name="binding_mailbox_active"),
            models.Index(fields=["pool", "provider"], name="binding_pool_provider", condition=Q(active=True)),
            models.Index(fields=["tenant", "-created_at"], name="binding_tenant_recent"),
        ]

    def __str__(self) -> str:
        return f"{self.account_ref} ({self.provider}) -> {self.mailbox_id}"
