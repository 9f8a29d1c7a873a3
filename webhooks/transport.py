"""Webhooks' use of the shared SSRF-safe transport (mailplatform/transport.py).

The rules live there, once; this module only binds them to the webhook settings:
``WEBHOOK_ALLOW_PRIVATE`` (development and tests: any address and port; the contract's name,
which also sets ``OUTBOUND_ALLOW_PRIVATE`` when that is not set itself), ``WEBHOOK_ALLOW_HTTP``,
``WEBHOOK_EXTRA_PORTS`` and ``WEBHOOK_CA_FILE``.
"""

from __future__ import annotations

from django.conf import settings

from mailplatform import transport
from mailplatform.transport import Policy, Response, Target, TransportError, UrlRefused

__all__ = ["Response", "Target", "TransportError", "UrlRefused", "address_allowed", "post", "url_parse", "url_resolve"]

# Only the start of a receiver's answer is kept, for the attempt's record.
RESPONSE_BODY_LIMIT = 1024
# Kept-alive connections to endpoints, shared by the process's delivery threads: a batch of
# deliveries to one receiver costs one TCP (and TLS) handshake, not one each. Each attempt
# still resolves and checks the URL; a connection is reused only for the same pinned address.
POOL = transport.ConnectionPool(idle=4.0, per_key=8)


def policy() -> Policy:
    """The webhook settings as a transport policy (read per call: tests override them)."""
    return Policy(
        allow_private=bool(settings.WEBHOOK_ALLOW_PRIVATE),
        allow_http=bool(settings.WEBHOOK_ALLOW_HTTP),
        extra_ports=frozenset(settings.WEBHOOK_EXTRA_PORTS),
        ca_file=settings.WEBHOOK_CA_FILE,
    )


def address_allowed(text: str) -> bool:
    return transport.address_allowed(text, policy())


def url_parse(url: str) -> tuple[str, str, int, str]:
    return transport.url_parse(url, policy())


def url_resolve(url: str) -> Target:
    return transport.url_resolve(url, policy())


def post(target: Target, body: bytes, headers: dict[str, str], *, timeout: float) -> Response:
    """POST ``body`` within ``timeout`` seconds; never follows redirects; keeps 1 KiB of the
    answer; over a kept-alive connection to the same checked address when there is one."""
    return transport.request(
        target,
        method="POST",
        policy=policy(),
        timeout=timeout,
        body_limit=RESPONSE_BODY_LIMIT,
        body=body,
        headers=headers,
        truncate=True,
        pool=POOL,
    )
