"""``Idempotency-Key`` for raw uploads: the same request sent again gets the first answer again.

The semantics of the IETF draft "The Idempotency-Key HTTP Header Field"
(draft-ietf-httpapi-idempotency-key-header): a key names one request of one client for
IDEMPOTENCY_KEY_TTL; the same key with the same request replays the stored answer (status
and body) without doing the work again; the same key with a different request is refused
(422 ``idempotency_key_reused``). Keys are scoped per tenant and principal (API key or
member). A request that fails leaves no key behind, so the client may retry it.

Concurrency: the key row is inserted in the same transaction as the work, under a unique
constraint; a concurrent duplicate's INSERT waits for the first transaction, then fails and
replays what the first one committed (PostgreSQL unique index semantics).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from ingest.models import UploadIdempotencyKey
from tenants.access import Principal

MAX_KEY_LENGTH = 255


class IdempotencyKeyInvalid(ValueError):
    """The header's value cannot be a key (empty, too long, or not printable ASCII)."""


class IdempotencyKeyReused(Exception):
    """The key was used for a different request within its lifetime."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    replayed: bool = False


def idempotency_key_clean(value: str) -> str:
    """The key as sent, checked: 1 to 255 printable ASCII characters."""
    key = value.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not all(" " <= char <= "~" for char in key):
        raise IdempotencyKeyInvalid(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters.")
    return key


def request_fingerprint(*parts: str | bytes) -> str:
    """sha256 over the request's parts, each length-prefixed so no two requests collide."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(f"{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


def _principal_scope(principal: Principal) -> str:
    actor = principal.actor
    return f"{actor.type}:{actor.api_key_id or actor.user_id or actor.label}"[:80]


def _replay(row: UploadIdempotencyKey, fingerprint: str) -> Answer:
    if row.fingerprint != fingerprint:
        raise IdempotencyKeyReused()
    return Answer(status=row.response_status, body=row.response_body, replayed=True)


def idempotent_answer(*, principal: Principal, key: str, fingerprint: str, produce: Callable[[], Answer]) -> Answer:
    """``produce()`` once per (tenant, principal, key) and its lifetime; its stored answer after that.

    ``produce`` runs inside the transaction that records the key: if it raises, the key is
    not recorded. Raises :class:`IdempotencyKeyReused` for the same key with another request.
    """
    scope = {"tenant_id": principal.tenant_id, "principal": _principal_scope(principal), "key": key}
    now = timezone.now()
    with transaction.atomic():
        UploadIdempotencyKey.objects.filter(**scope, expires_at__lte=now).delete()
        existing = UploadIdempotencyKey.objects.filter(**scope).first()
        if existing is not None:
            return _replay(existing, fingerprint)
        try:
            with transaction.atomic():
                row = UploadIdempotencyKey.objects.create(
                    **scope,
                    fingerprint=fingerprint,
                    response_status=0,
                    response_body={},
                    created_at=now,
                    expires_at=now + timedelta(seconds=settings.IDEMPOTENCY_KEY_TTL),
                )
        except IntegrityError:
            # A concurrent request with this key committed first (our INSERT waited for it).
            return _replay(UploadIdempotencyKey.objects.get(**scope), fingerprint)
        answer = produce()
        row.response_status, row.response_body = answer.status, answer.body
        row.save(update_fields=["response_status", "response_body"])
    return answer


def idempotency_keys_purge(*, limit: int = 10_000) -> int:
    """Delete expired keys (at most ``limit`` per call); returns how many."""
    expired = list(
        UploadIdempotencyKey.objects.filter(expires_at__lte=timezone.now()).values_list("pk", flat=True)[:limit]
    )
    if not expired:
        return 0
    deleted, _ = UploadIdempotencyKey.objects.filter(pk__in=expired).delete()
    return deleted
