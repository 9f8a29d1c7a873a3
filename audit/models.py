"""The tenant's event log and the audit trail.

Both name ``tenants.Tenant`` by label only: audit sits below every other app, so anyone may
record an event without an import cycle.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from django.db import models
from django.db.models import Func, Q
from django.db.models.expressions import RawSQL

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid() -> str:
    """A 26-character, time-ordered, URL-safe identifier (ULID layout)."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def event_public_id() -> str:
    return f"evt_{ulid()}"


EVENT_ID_PATTERN = r"evt_[0-9A-HJKMNP-TV-Z]{26}"
# An event type or a prefix filter: "message.quarantined", "message.*".
EVENT_TYPE_PATTERN = r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*(\.\*)?"


class CurrentTransactionId(Func):
    """The writing transaction's id on PostgreSQL, NULL elsewhere (used as a column default).

    Sequence values are handed out in insert order, not commit order, so a reader paging by
    ``seq`` alone could step past an event whose transaction commits a moment later. Ordering
    by (txid, seq) and only showing transactions older than every running one closes that gap.
    SQLite serializes writers, so ``seq`` alone is already commit order there.
    """

    output_field = models.BigIntegerField()
    template = "NULL"

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:
        return "(pg_current_xact_id()::text::bigint)", []


class EventQuerySet(models.QuerySet["Event"]):
    def committed(self) -> EventQuerySet:
        """Events whose position can no longer be overtaken by a running transaction."""
        from django.db import connections

        if connections[self.db].vendor != "postgresql":
            return self
        horizon = RawSQL("pg_snapshot_xmin(pg_current_snapshot())::text::bigint", [])
        own = RawSQL("pg_current_xact_id_if_assigned()::text::bigint", [])
        return self.filter(Q(txid__lt=horizon) | Q(txid=own))

    def after_position(self, txid: int | None, seq: int) -> EventQuerySet:
        if txid is None:
            return self.filter(seq__gt=seq)
        return self.filter(Q(txid__gt=txid) | Q(txid=txid, seq__gt=seq))

    def in_log_order(self) -> EventQuerySet:
        return self.order_by("txid", "seq")


class Event(models.Model):
    """One thing that happened in a tenant: the log entry and the webhook body are its JSON."""

    seq = models.BigAutoField(primary_key=True)
    txid = models.BigIntegerField(null=True, editable=False, db_default=CurrentTransactionId())
    public_id = models.CharField(max_length=40, unique=True, default=event_public_id, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="events")
    type = models.CharField(max_length=64)
    timestamp = models.DateTimeField()
    trace_id = models.CharField(max_length=64, blank=True)
    data = models.JSONField(default=dict)
    # Pointers used to scope the log to a key's resource allow-list and to filter it.
    domain_id = models.UUIDField(null=True, blank=True)
    mailbox_id = models.UUIDField(null=True, blank=True)
    message_id = models.UUIDField(null=True, blank=True)

    objects = EventQuerySet.as_manager()

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "txid", "seq"], name="event_tenant_position"),
            models.Index(fields=["tenant", "type", "seq"], name="event_tenant_type"),
            models.Index(fields=["mailbox_id", "seq"], name="event_mailbox"),
            models.Index(fields=["message_id"], name="event_message"),
        ]

    def __str__(self) -> str:
        return f"{self.public_id} {self.type}"

    def as_json(self) -> dict[str, Any]:
        """The contract shape (DESIGN section 6), identical in the log and in webhooks."""
        return {
            "id": self.public_id,
            "type": self.type,
            "timestamp": self.timestamp.isoformat().replace("+00:00", "Z"),
            "tenant": str(self.tenant_id),
            "trace_id": self.trace_id,
            "data": self.data,
        }


class AuditEntry(models.Model):
    """Who did what to which control-plane resource, from where. Append-only."""

    class ActorType(models.TextChoices):
        USER = "user", "User"
        API_KEY = "api_key", "API key"
        STAFF = "staff", "Staff"
        SYSTEM = "system", "System"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.SET_NULL, null=True, blank=True, related_name="audit_entries"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor_type = models.CharField(max_length=16, choices=ActorType.choices)
    actor_user = models.ForeignKey("tenants.User", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    actor_api_key = models.ForeignKey(
        "tenants.ApiKey", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    # Kept as text so the entry still says who it was after the user or key is gone.
    actor_label = models.CharField(max_length=320, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=256, blank=True)
    action = models.CharField(max_length=64)
    resource_type = models.CharField(max_length=32, blank=True)
    resource_id = models.CharField(max_length=64, blank=True)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    correlation_id = models.CharField(max_length=64, blank=True)
    # Nobody proved who they are (a refused sign-in): what it says about itself is only a claim.
    anonymous = models.BooleanField(default=False)

    class Meta:
        verbose_name_plural = "audit entries"
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["tenant", "-created_at"], name="audit_tenant_recent"),
            models.Index(fields=["tenant", "action"], name="audit_tenant_action"),
            # The per-address bound on anonymous entries counts these (audit.services).
            models.Index(
                fields=["tenant", "ip", "created_at"], name="audit_anonymous_by_ip", condition=Q(anonymous=True)
            ),
        ]

    def __str__(self) -> str:
        return f"{self.actor_label or self.actor_type} {self.action} {self.resource_type}:{self.resource_id}"
