from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import dkim
import dns.resolver


def zone_txt(zone: Any) -> Callable[..., bytes]:
    """dkimpy's ``dnsfunc``, asking the test's DNS server (the published records, really)."""

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = zone.port
        resolver.cache = None
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return b""
        return b"".join(b"".join(record.strings) for record in answer)

    return lookup


def dkim_verifies(content: bytes, zone: Any) -> bool:
    return bool(dkim.verify(content, dnsfunc=zone_txt(zone)))


def dkim_key_publish(client: Any, zone: Any, domain: Any, algorithm: str = "rsa") -> dict[str, Any]:
    """Create a key through the API, publish its TXT record, verify it: the active key."""
    created = client.post(f"/api/v1/domains/{domain.pk}/dkim-keys/", {"algorithm": algorithm}, format="json")
    assert created.status_code == 201, created.content
    key = created.json()
    zone.set(key["record_name"], "TXT", [key["record_value"]])
    verified = client.post(f"/api/v1/domains/{domain.pk}/dkim-keys/{key['id']}/verify/")
    assert verified.status_code == 200, verified.content
    assert verified.json()["state"] == "active", verified.json()
    return dict(verified.json())


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
