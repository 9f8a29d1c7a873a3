"""Standard Webhooks signing (https://www.standardwebhooks.com/, "Signature scheme").

A secret is ``whsec_`` + base64 of 32 random bytes; the HMAC-SHA256 key is the decoded bytes.
The signed content is ``{webhook-id}.{webhook-timestamp}.{body}``; ``webhook-signature`` is
``v1,<base64 signature>``, space-separated when several secrets are active (rotation).
Secrets are stored encrypted with Fernet (settings.FIELD_ENCRYPTION_KEY).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from functools import lru_cache

from cryptography.fernet import Fernet
from django.conf import settings

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret


def secret_generate() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of the body under ``secret``."""
    content = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key_bytes(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(active_secrets: Iterable[str], message_id: str, timestamp: int, body: bytes) -> str:
    return " ".join(signature(secret, message_id, timestamp, body) for secret in active_secrets)


@lru_cache(maxsize=4)
def _fernet(key: str) -> Fernet:
    return Fernet(key.encode())


def secret_encrypt(secret: str) -> str:
    return _fernet(settings.FIELD_ENCRYPTION_KEY).encrypt(secret.encode()).decode()


def secret_decrypt(token: str) -> str:
    return _fernet(settings.FIELD_ENCRYPTION_KEY).decrypt(token.encode()).decode()
