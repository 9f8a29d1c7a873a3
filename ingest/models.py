"""Rows of the mail path's front half: idempotency keys of API uploads, and node heartbeats."""

from __future__ import annotations

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
