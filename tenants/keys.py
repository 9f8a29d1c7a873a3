"""The API key format: ``mp_`` + 32 random base62 characters + a 6-character checksum.

The checksum (CRC32 of the random part, base62) lets secret scanners recognise a real key
and lets us refuse a mistyped one without touching the database. Only a keyed HMAC-SHA256 of
the whole key is stored, under API_KEY_PEPPER; the first 8 random characters are kept in
clear as a lookup prefix, the last 4 for display.

Account-binding links (mailboxes/bindings/) have the same shape under ``mpl_``
(``LINK_PREFIX``): pass ``prefix=`` to each function.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass

from django.conf import settings

PREFIX = "mp_"
LINK_PREFIX = "mpl_"
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_RANDOM_LENGTH = 32  # 62**32 is about 2**190
_CHECKSUM_LENGTH = 6
LOOKUP_LENGTH = 8
_SHAPES = {
    prefix: re.compile(rf"^{prefix}[0-9A-Za-z]{{{_RANDOM_LENGTH + _CHECKSUM_LENGTH}}}$")
    for prefix in (PREFIX, LINK_PREFIX)
}


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, remainder = divmod(number, 62)
        digits.append(_ALPHABET[remainder])
    return "".join(reversed(digits))


def _checksum(random_part: str) -> str:
    return _base62(zlib.crc32(random_part.encode()), _CHECKSUM_LENGTH)


@dataclass(frozen=True)
class GeneratedKey:
    secret: str
    prefix: str
    secret_hash: str
    last_four: str


def generate(prefix: str = PREFIX) -> GeneratedKey:
    random_part = "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_LENGTH))
    secret = f"{prefix}{random_part}{_checksum(random_part)}"
    return GeneratedKey(
        secret=secret, prefix=lookup_prefix(secret, prefix), secret_hash=digest(secret), last_four=secret[-4:]
    )


def is_well_formed(secret: str, prefix: str = PREFIX) -> bool:
    """Shape and checksum; a key failing this cannot exist, so no lookup is needed."""
    if not _SHAPES[prefix].match(secret):
        return False
    random_part = secret[len(prefix) : len(prefix) + _RANDOM_LENGTH]
    return hmac.compare_digest(secret[-_CHECKSUM_LENGTH:], _checksum(random_part))


def lookup_prefix(secret: str, prefix: str = PREFIX) -> str:
    return secret[len(prefix) : len(prefix) + LOOKUP_LENGTH]


def digest(secret: str) -> str:
    return hmac.new(settings.API_KEY_PEPPER.encode(), secret.encode(), hashlib.sha256).hexdigest()


def matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(digest(secret), stored_hash)
