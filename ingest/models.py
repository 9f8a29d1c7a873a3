"""Rows of the mail path's front half: idempotency keys of API uploads, and node heartbeats."""

from __future__ import annotations

import uuid

from django.db import models


class UploadIdempotencyKey(models.Model):
    """A client's ``Idempotency-Key`` for a raw upload, with the first answer to replay.

    Scoped to the tenant and the principal that sent it (an API key or a member), so two
    clients never see each other's answers; kept until ``expires_at``, then swept.
    """

    id = models.BigAutoField(primary_key=True)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    principal = models.CharField(max_length=80)  # "api_key:<id>" or "user:<id>"
    key = models.CharField(max_length=255)
    # sha256 of what the request asked for (mailbox, envelope sender, body): a key reused
    # for a different request is refused instead of answering for the wrong one.
    fingerprint = models.CharField(max_length=64)
    response_status = models.PositiveSmallIntegerField()
    response_body = models.JSONField()
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            # Concurrent duplicates: the second INSERT waits for the first transaction and
            # then fails, and replays the committed answer.
            models.UniqueConstraint(fields=["tenant", "principal", "key"], name="ingest_idempotency_key_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.principal} {self.key}"


class Heartbeat(models.Model):
    """A process that moves mail says it is alive: SMTP nodes, Celery workers, connector runners.

    One row per (kind, node); ``last_seen`` is refreshed every HEARTBEAT_INTERVAL seconds.
    ``details`` holds what the node alone can see, such as its spool's depth and the age of
    its oldest entry.
    """

    class Kind(models.TextChoices):
        SMTP = "smtp", "SMTP/LMTP node"
        WORKER = "worker", "Celery worker"
        CONNECTORS = "connectors", "IMAP connector runner"

    id = models.BigAutoField(primary_key=True)
    kind = models.CharField(max_length=20, choices=Kind.choices)
    node = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField()
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["kind", "node"], name="ingest_heartbeat_kind_node_unique")]

    def __str__(self) -> str:
        return f"{self.kind} {self.node}"


class Connector(models.Model):
    """An existing IMAP account whose mail we pull into one of the tenant's mailboxes.

    Secrets (password, OAuth client secret, refresh and access tokens) are stored encrypted
    (``tenants.crypto``) and never returned. The runner (``runconnectors``) claims a
    connector through the lease columns: ``lease_owner`` holds it until ``lease_expires_at``,
    and ``lease_token`` grows on every claim, so a runner that lost its lease cannot move a
    cursor any more (fencing: every cursor write checks the token it claimed with).
    """

    class TlsMode(models.TextChoices):
        IMPLICIT = "implicit", "Implicit TLS (port 993)"
        STARTTLS = "starttls", "STARTTLS (port 143)"
        NONE = "none", "Plaintext (development only)"

    class AuthType(models.TextChoices):
        PASSWORD = "password", "Password"
        XOAUTH2 = "xoauth2", "OAuth2 (XOAUTH2)"
        OAUTHBEARER = "oauthbearer", "OAuth2 (OAUTHBEARER)"

    class State(models.TextChoices):
        CONNECTING = "connecting", "Connecting"
        IDLE = "idle", "Idle (real time)"
        POLLING = "polling", "Polling"
        BACKOFF = "backoff", "Waiting to reconnect"
        AUTH_FAILED = "auth_failed", "Authentication failed"
        DISABLED = "disabled", "Disabled"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    mailbox = models.ForeignKey("mailboxes.Mailbox", on_delete=models.CASCADE, related_name="connectors")
    name = models.CharField(max_length=200, blank=True)
    host = models.CharField(max_length=253)
    port = models.PositiveIntegerField()
    tls_mode = models.CharField(max_length=16, choices=TlsMode.choices, default=TlsMode.IMPLICIT)
    auth_type = models.CharField(max_length=16, choices=AuthType.choices, default=AuthType.PASSWORD)
    username = models.CharField(max_length=320)
    password_encrypted = models.TextField(blank=True)
    # OAuth2 (authorization-code flow with PKCE): the client and provider endpoints.
    oauth_provider = models.CharField(max_length=32, blank=True)
    oauth_client_id = models.CharField(max_length=500, blank=True)
    oauth_client_secret_encrypted = models.TextField(blank=True)
    oauth_authorize_url = models.CharField(max_length=2000, blank=True)
    oauth_token_url = models.CharField(max_length=2000, blank=True)
    oauth_scope = models.CharField(max_length=1000, blank=True)
    oauth_refresh_token_encrypted = models.TextField(blank=True)
    oauth_access_token_encrypted = models.TextField(blank=True)
    oauth_access_token_expires_at = models.DateTimeField(null=True, blank=True)
    folders = models.JSONField(default=list)
    active = models.BooleanField(default=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.CONNECTING)
    last_error = models.CharField(max_length=500, blank=True)
    last_error_kind = models.CharField(max_length=32, blank=True)
    last_error_at = models.DateTimeField(null=True, blank=True)
    last_connected_at = models.DateTimeField(null=True, blank=True)
    last_fetched_at = models.DateTimeField(null=True, blank=True)
    # Bumped by the API (update, resync, reconnect): the runner restarts the session.
    generation = models.PositiveIntegerField(default=1)
    resync_requested_at = models.DateTimeField(null=True, blank=True)
    lease_owner = models.CharField(max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    lease_token = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["tenant", "-created_at"], name="connector_tenant_recent"),
            models.Index(fields=["active", "lease_expires_at"], name="connector_lease"),
        ]

    def __str__(self) -> str:
        return f"{self.username}@{self.host}"


class ConnectorFolder(models.Model):
    """The cursor of one watched folder: its UIDVALIDITY and the last UID taken in."""

    id = models.BigAutoField(primary_key=True)
    connector = models.ForeignKey(Connector, on_delete=models.CASCADE, related_name="folder_cursors")
    name = models.CharField(max_length=500)
    uid_validity = models.PositiveBigIntegerField()
    last_uid = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["connector", "name"], name="ingest_connector_folder_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.connector_id} {self.name} {self.uid_validity}:{self.last_uid}"


class ConnectorSeen(models.Model):
    """A message a connector already took in: (Message-ID, sha256) per connector.

    Reconnects, resyncs and UIDVALIDITY changes fetch some messages again; this row makes
    the second fetch a no-op. ``message_id_hash`` is the sha256 of the Message-ID header
    (empty when there is none), so the row has a fixed size whatever the header holds.
    """

    id = models.BigAutoField(primary_key=True)
    connector = models.ForeignKey(Connector, on_delete=models.CASCADE, related_name="+")
    message_id_hash = models.CharField(max_length=64)
    sha256 = models.CharField(max_length=64)
    queue_id = models.CharField(max_length=40)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["connector", "message_id_hash", "sha256"], name="ingest_connector_seen_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.connector_id} {self.sha256[:12]}"
