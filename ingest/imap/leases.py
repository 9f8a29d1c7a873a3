"""The runner's writes: leases on connectors, cursors fenced by the lease token, dedupe, state.

A runner claims connectors with ``SELECT ... FOR UPDATE SKIP LOCKED`` (two runners never
claim the same row at once), writing its ``lease_owner``, a ``lease_expires_at`` and a new
``lease_token``; it renews its leases while it holds them. A dead runner's connectors are
claimed by another once their lease has expired. Every cursor write happens in a
transaction that first locks the connector row *with the token it was claimed with*: a
runner that lost its lease (paused, partitioned, then back) finds a different token and
writes nothing (fencing), so no message is taken twice by two runners.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from audit.services import event_record
from ingest.models import Connector, ConnectorFolder, ConnectorSeen
from ingest.spool import Recipient, Spool

logger = logging.getLogger(__name__)

CLAIMABLE_STATES = [
    Connector.State.CONNECTING,
    Connector.State.IDLE,
    Connector.State.POLLING,
    Connector.State.BACKOFF,
]


class LeaseLost(Exception):
    """This runner no longer holds the connector (another claimed it, or it was disabled)."""


class CursorGone(Exception):
    """The folder's cursor was deleted (a resync) after the session read it."""


@dataclass(frozen=True)
class Claim:
    connector_id: UUID
    token: int
    generation: int
    taken_over: bool  # the previous lease had expired under another owner


def leases_claim(*, owner: str, limit: int, exclude: set[UUID]) -> list[Claim]:
    """Claim up to ``limit`` free connectors (never leased, released, or lease expired)."""
    if limit <= 0:
        return []
    now = timezone.now()
    expires = now + timedelta(seconds=settings.CONNECTOR_LEASE_SECONDS)
    claims: list[Claim] = []
    with transaction.atomic():
        queryset = (
            Connector.objects.filter(active=True, state__in=CLAIMABLE_STATES)
            .filter(Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now))
            .exclude(pk__in=exclude)
            .order_by(F("lease_expires_at").asc(nulls_first=True), "created_at")
        )
        if connection.features.has_select_for_update_skip_locked:
            queryset = queryset.select_for_update(skip_locked=True)
        rows = list(queryset.values("pk", "lease_owner", "lease_token", "generation")[:limit])
        for row in rows:
            token = row["lease_token"] + 1
            # The conditional UPDATE also settles SQLite (no SKIP LOCKED): only one claimer
            # sees the old token.
            updated = Connector.objects.filter(pk=row["pk"], lease_token=row["lease_token"]).update(
                lease_owner=owner, lease_expires_at=expires, lease_token=token
            )
            if updated:
                claims.append(
                    Claim(
                        row["pk"],
                        token,
                        row["generation"],
                        taken_over=bool(row["lease_owner"]) and row["lease_owner"] != owner,
                    )
                )
    return claims


def leases_renew(*, owner: str, held: dict[UUID, int]) -> dict[UUID, int]:
    """Extend the leases still ours; returns connector -> generation of those kept.

    A connector missing from the answer was lost (taken over, deleted, disabled or put in
    ``auth_failed``): its session must stop. One statement on PostgreSQL whatever the number
    of accounts: the (id, token) pairs held as two arrays, ``RETURNING`` what was kept.
    """
    if not held:
        return {}
    expires = timezone.now() + timedelta(seconds=settings.CONNECTOR_LEASE_SECONDS)
    if connection.vendor == "postgresql":
        table = Connector._meta.db_table  # a constant, not input
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {table} SET lease_expires_at = %s WHERE lease_owner = %s AND active"  # noqa: S608
                " AND state = ANY(%s) AND (id, lease_token) IN (SELECT * FROM unnest(%s::uuid[], %s::bigint[]))"
                " RETURNING id, lease_token, generation",
                [expires, owner, [str(state) for state in CLAIMABLE_STATES], list(held), list(held.values())],
            )
            rows = cursor.fetchall()
    else:
        queryset = Connector.objects.filter(
            pk__in=list(held), lease_owner=owner, active=True, state__in=CLAIMABLE_STATES
        )
        with transaction.atomic():
            queryset.update(lease_expires_at=expires)
            rows = list(queryset.values_list("pk", "lease_token", "generation"))
    return {pk: generation for pk, token, generation in rows if held.get(pk) == token}


def lease_release(*, connector_id: UUID, token: int) -> None:
    """Give a connector back at once (shutdown): another runner may claim it right away."""
    Connector.objects.filter(pk=connector_id, lease_token=token).update(lease_owner="", lease_expires_at=None)


def _locked(connector_id: UUID, token: int) -> Connector:
    """The connector row, locked, if this runner still holds it; LeaseLost otherwise."""
    row = Connector.objects.select_for_update().filter(pk=connector_id, lease_token=token).first()
    if row is None:
        raise LeaseLost(str(connector_id))
    return row


# --- Reads for the session -------------------------------------------------------------
def connector_load(connector_id: UUID) -> Connector:
    return Connector.objects.select_related("mailbox").get(pk=connector_id)


def cursor_get(connector_id: UUID, folder: str) -> ConnectorFolder | None:
    return ConnectorFolder.objects.filter(connector_id=connector_id, name=folder).first()


def cursor_set(*, connector_id: UUID, token: int, folder: str, uid_validity: int, last_uid: int) -> None:
    """Move a folder's cursor (fenced)."""
    with transaction.atomic():
        _locked(connector_id, token)
        ConnectorFolder.objects.update_or_create(
            connector_id=connector_id, name=folder, defaults={"uid_validity": uid_validity, "last_uid": last_uid}
        )


# --- Taking a message in -----------------------------------------------------------------
def message_id_hash(content: bytes) -> str:
    """sha256 of the Message-ID header (empty string when there is none)."""
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(content[:65536])
    value = str(headers.get("Message-ID", "") or "").strip()
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest() if value else ""


def message_take(
    *,
    connector_id: UUID,
    token: int,
    folder: str,
    uid_validity: int,
    uid: int,
    content: bytes,
    spool: Spool | None = None,
) -> str | None:
    """Take one fetched message in (:func:`messages_take` with one message)."""
    return messages_take(
        connector_id=connector_id, token=token, folder=folder, uid_validity=uid_validity,
        messages=[(uid, content)], spool=spool,
    )[0]  # fmt: skip


def messages_take(
    *,
    connector_id: UUID,
    token: int,
    folder: str,
    uid_validity: int,
    messages: list[tuple[int, bytes | None]],
    spool: Spool | None = None,
) -> list[str | None]:
    """Take fetched messages in, in UID order: a queue id each, None for a duplicate or a
    UID without content (too large, or expunged: the cursor moves past it).

    One transaction, fenced by the lease token (the connector row locked with it): the
    folder's cursor moved to the last UID, then per message the dedupe check (Message-ID,
    sha256) and, for a new one, the durable spool write (``accept``) and its dedupe row.
    The cursor's move becomes visible only with the commit, after every spool write is
    durable; a crash before the commit leaves the cursor where it was, so the messages are
    fetched again; the spool entries written meanwhile have no dedupe row, but their drain
    and the retry carry the same bytes (the retry's entry is a duplicate only in that rare
    window). The row lock serialises every take of the connector, so the check and the
    insert of a dedupe row cannot race. CursorGone when the folder's cursor was deleted (a
    resync) since the session read it: nothing is written, the session reads it again.
    """
    from ingest.services import accept
    from mailboxes.models import Message

    if not messages:
        return []
    queue_ids: list[str | None] = []
    with transaction.atomic():
        # The lock and what accept needs in one statement, only those columns: the take is
        # the runner's hottest path, and building a query of two wide models costs CPU.
        row = list(
            Connector.objects.filter(pk=connector_id, lease_token=token)
            .select_for_update(of=("self",))
            .values_list("host", "tls_mode", "mailbox_id", "mailbox__address", "mailbox__tenant_id")
        )
        if not row:
            raise LeaseLost(str(connector_id))
        host, tls_mode, mailbox_id, address, tenant_id = row[0]
        moved = ConnectorFolder.objects.filter(connector_id=connector_id, name=folder).update(
            uid_validity=uid_validity, last_uid=messages[-1][0], updated_at=timezone.now()
        )
        if not moved:
            raise CursorGone(f"{connector_id} {folder}")
        keys = [
            (message_id_hash(content), hashlib.sha256(content).hexdigest()) if content is not None else None
            for _uid, content in messages
        ]
        seen = set(
            ConnectorSeen.objects.filter(
                connector_id=connector_id, sha256__in={key[1] for key in keys if key is not None}
            ).values_list("message_id_hash", "sha256")
        )
        rows: list[ConnectorSeen] = []
        for (_uid, content), key in zip(messages, keys, strict=True):
            if content is None or key is None or key in seen:
                queue_ids.append(None)
                continue
            seen.add(key)  # the same message twice in one batch (a copy) is taken once
            queue_id = accept(
                content=content,
                mail_from="",
                recipients=[Recipient(address=address, mailbox_id=str(mailbox_id), tenant_id=str(tenant_id))],
                helo=f"imap:{host}"[:255],
                tls=tls_mode != Connector.TlsMode.NONE,
                source=Message.Source.IMAP,
                spool=spool,
            )
            rows.append(
                ConnectorSeen(connector_id=connector_id, message_id_hash=key[0], sha256=key[1], queue_id=queue_id)
            )
            queue_ids.append(queue_id)
        if rows:
            ConnectorSeen.objects.bulk_create(rows)
        Connector.objects.filter(pk=connector_id).update(last_fetched_at=timezone.now())
    return queue_ids


# --- State ---------------------------------------------------------------------------------
def state_set(
    *,
    connector_id: UUID,
    token: int,
    state: str,
    error: str = "",
    error_kind: str = "",
) -> str:
    """Record the session's state; events on the transitions that matter. Returns the old state.

    ``connector.connected`` when a session reaches idle/polling from anything else,
    ``connector.error`` when it enters backoff (once per error run, not per retry),
    ``connector.auth_failed`` when the credentials were refused (the lease is released:
    nobody retries until the connector is changed or reconnected), with a mail to the admins.
    """
    from ingest.imap.services import admins_notify_auth_failed

    with transaction.atomic():
        connector = _locked(connector_id, token)
        previous = connector.state
        now = timezone.now()
        updates: dict[str, Any] = {"state": state}
        event_type = ""
        data: dict[str, Any] = {"connector": str(connector_id), "host": connector.host}
        if state in {Connector.State.IDLE, Connector.State.POLLING}:
            updates["last_connected_at"] = now
            if previous not in {Connector.State.IDLE, Connector.State.POLLING}:
                event_type = "connector.connected"
                data["mode"] = state
        elif state == Connector.State.BACKOFF:
            updates.update(last_error=error[:500], last_error_kind=error_kind[:32], last_error_at=now)
            if previous != Connector.State.BACKOFF or connector.last_error_kind != error_kind:
                event_type = "connector.error"
                data.update(kind=error_kind, message=error[:300])
        elif state == Connector.State.AUTH_FAILED:
            updates.update(
                last_error=error[:500], last_error_kind="auth_failed", last_error_at=now, lease_owner="",
                lease_expires_at=None,
            )  # fmt: skip
            if previous != Connector.State.AUTH_FAILED:
                event_type = "connector.auth_failed"
                data["message"] = error[:300]
                tenant_id, label = connector.tenant_id, f"{connector.username} on {connector.host}"
                transaction.on_commit(
                    lambda: admins_notify_auth_failed(tenant_id, connector_id, label, error[:300]), robust=True
                )
        Connector.objects.filter(pk=connector_id).update(**updates)
        if event_type:
            event_record(tenant_id=connector.tenant_id, type=event_type, data=data, mailbox_id=connector.mailbox_id)
    return previous


def oauth_tokens_store(
    *, connector_id: UUID, token: int, access_token: str, expires_at: Any, refresh_token: str | None
) -> None:
    """Keep a refreshed access token (and a rotated refresh token), encrypted."""
    from tenants import crypto

    with transaction.atomic():
        _locked(connector_id, token)
        updates: dict[str, Any] = {
            "oauth_access_token_encrypted": crypto.encrypt(access_token),
            "oauth_access_token_expires_at": expires_at,
        }
        if refresh_token:
            updates["oauth_refresh_token_encrypted"] = crypto.encrypt(refresh_token)
        Connector.objects.filter(pk=connector_id).update(**updates)
