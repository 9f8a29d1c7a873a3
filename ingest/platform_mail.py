"""Sign-in and invitation mail the platform sends, recognised when it comes back in.

A member's address may well be one of their tenant's own mailboxes (or forward to one). Left
alone, the sign-in link mailed to it would become readable mail: a viewer, or an API key
scoped to that mailbox, asks for the owner's link from their own browser (so the link's
browser binding does not help), reads it in the inbox and signs in as the owner.

So every such message carries ``X-Mailplatform-Signin: v1; t=<unix time>; s=<signature>``:
an HMAC-SHA256, under a key derived from SECRET_KEY with its own purpose salt, of the
version, the time and the address it was sent to. The drainer drops a message that carries
a valid one before any Message row exists (:func:`ingest.services.spool_entries_drain`).
A forged header (no key) verifies nothing, and a genuine one copied onto another message
only matches the address it was sent to and only for ``SIGNIN_MAIL_MAX_AGE``: past that,
the link inside has long expired anyway.
"""

from __future__ import annotations

import base64
import hmac
import re
import time
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

from django.utils.crypto import salted_hmac

HEADER = "X-Mailplatform-Signin"
VERSION = "v1"
SALT = "mailplatform.ingest.platform_mail.signin"
# Longer than a relay keeps retrying (RFC 5321 section 4.5.4.1: give up after 4-5 days).
SIGNIN_MAIL_MAX_AGE = 7 * 24 * 3600
_VALUE = re.compile(r"^\s*v1;\s*t=(\d{1,12});\s*s=([A-Za-z0-9_-]{43})\s*$")
_HEADER_NAME = re.compile(rb"(?im)^x-mailplatform-signin:")


def _signature(timestamp: int, recipient: str) -> str:
    value = f"{VERSION}.{timestamp}.{recipient.strip().lower()}"
    digest = salted_hmac(SALT, value, algorithm="sha256").digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def signin_mail_headers(recipient: str, *, now: float | None = None) -> dict[str, str]:
    """The headers that mark a sign-in or invitation message sent to ``recipient``."""
    timestamp = int(time.time() if now is None else now)
    return {HEADER: f"{VERSION}; t={timestamp}; s={_signature(timestamp, recipient)}"}


def is_signin_mail(content: bytes, *, now: float | None = None) -> bool:
    """Whether ``content`` is sign-in mail of ours: a valid, recent signature for its To address.

    Cheap for everything else: only a header section naming the header is parsed.
    """
    head = content.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    if not _HEADER_NAME.search(head):
        return False
    headers = BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n\r\n")
    current = time.time() if now is None else now
    recipients = [address for _, address in getaddresses([str(value) for value in headers.get_all("To", [])])]
    for value in headers.get_all(HEADER, []):
        match = _VALUE.match(str(value))
        if match is None:
            continue
        timestamp = int(match.group(1))
        if not -300 <= current - timestamp <= SIGNIN_MAIL_MAX_AGE:  # a little clock skew forward
            continue
        for recipient in recipients:
            if hmac.compare_digest(match.group(2), _signature(timestamp, recipient)):
                return True
    return False
