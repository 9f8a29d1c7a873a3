"""Keys, signatures and DNS records for the trust-verdict tests (dkimpy signs, the Zone serves).

The keys are made by the test run itself: RSA (PKCS#1 PEM to sign, SubjectPublicKeyInfo in
the DNS, RFC 6376 section 3.6.1) and ed25519 (a 32-byte seed to sign, the raw public key in
the DNS, RFC 8463 section 4).
"""

from __future__ import annotations

import base64
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import dkim
import nacl.encoding
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id"]
OUR_ID = "mx.receiver.test"  # our authserv-id (SMTP_HOSTNAME) in these tests


def zone_prepare(zone: Any, settings: Any) -> Any:
    """Verification on, our authserv-id, origin.test's SPF and DMARC, nothing cached from before."""
    from mailboxes import authentication

    settings.AUTH_VERIFY = True
    settings.AUTH_DNS_TIMEOUT = 2
    settings.SMTP_HOSTNAME = OUR_ID
    authentication.dns_cache_clear()
    publish_sender(zone)
    return zone


def deliver(
    mailbox: Any,
    raw: bytes,
    *,
    source: str = "smtp",
    remote_ip: str | None = "127.0.0.1",
    helo: str = "mail.origin.test",
    mail_from: str = "bounce@origin.test",
) -> Any:
    """Stored as the drainer stores mail from that envelope, then parsed and indexed here."""
    from mailboxes import pipeline
    from mailboxes.models import Message
    from mailboxes.tests.helpers import message_store

    message = message_store(mailbox, raw)
    Message.objects.filter(pk=message.pk).update(source=source, remote_ip=remote_ip, helo=helo, mail_from=mail_from)
    assert pipeline.message_parse(message_id=message.pk, index=True) == "indexed"
    message.refresh_from_db()
    return message


@dataclass(frozen=True)
class SigningKey:
    algorithm: bytes  # rsa-sha256 or ed25519-sha256
    private: bytes  # what dkimpy signs with
    record: str  # the TXT record at <selector>._domainkey.<domain>


@cache
def rsa_key(name: str = "a", bits: int = 2048) -> SigningKey:
    """An RSA key per name for the whole run (generating one costs tens of milliseconds)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return SigningKey(b"rsa-sha256", private, f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}")


@cache
def ed25519_key(name: str = "a") -> SigningKey:
    key = nacl.signing.SigningKey.generate()
    private = key.encode(encoder=nacl.encoding.Base64Encoder)
    public = key.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode()
    return SigningKey(b"ed25519-sha256", private, f"v=DKIM1; k=ed25519; p={public}")


def message(
    *,
    sender: str = "Origin <news@origin.test>",
    to: str = "inbox@acme.example.test",
    subject: str = "Your code",
    body: str = "Your verification code is 482913\r\n",
    extra: str = "",
) -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@origin.test>\r\n{extra}"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    ).encode()


def dkim_sign(raw: bytes, key: SigningKey, *, domain: str = "origin.test", selector: str = "s1") -> bytes:
    """``raw`` with one more DKIM-Signature on top."""
    signature = dkim.sign(
        raw,
        selector.encode(),
        domain.encode(),
        key.private,
        signature_algorithm=key.algorithm,
        include_headers=SIGNED_HEADERS,
        canonicalize=(b"relaxed", b"relaxed"),
    )
    return bytes(signature) + raw


def arc_hop(raw: bytes, key: SigningKey, *, domain: str, results: str, selector: str = "arc") -> bytes:
    """One forwarding hop (RFC 8617 section 5.1): its own Authentication-Results, then its ARC set."""
    raw = f"Authentication-Results: {domain}; {results}\r\n".encode() + raw
    headers = dkim.arc_sign(raw, selector.encode(), domain.encode(), key.private, domain.encode())
    assert headers, "dkimpy made no ARC set (no Authentication-Results of the hop?)"
    return b"".join(headers) + raw


def publish_key(zone: Any, key: SigningKey, *, domain: str = "origin.test", selector: str = "s1") -> None:
    zone.set(f"{selector}._domainkey.{domain}", "TXT", [key.record])


def publish_sender(
    zone: Any,
    domain: str = "origin.test",
    *,
    spf: str | None = "v=spf1 ip4:127.0.0.1 -all",
    dmarc: str | None = "v=DMARC1; p=reject",
) -> None:
    """SPF at the domain, DMARC at _dmarc.<domain> (None: no record)."""
    if spf is not None:
        zone.set(domain, "TXT", [spf])
    if dmarc is not None:
        zone.set(f"_dmarc.{domain}", "TXT", [dmarc])


@contextmanager
def failing_dns() -> Iterator[tuple[str, int]]:
    """A DNS server on loopback that answers every question SERVFAIL (a broken resolver)."""
    from dnslib import RCODE, DNSRecord

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = DNSRecord.parse(data).reply()
            reply.header.rcode = RCODE.SERVFAIL
            sock.sendto(reply.pack(), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield ("127.0.0.1", sock.getsockname()[1])
    finally:
        stop.set()
        thread.join(2)
        sock.close()


@contextmanager
def silent_dns() -> Iterator[tuple[str, int]]:
    """A DNS server address on loopback that takes every question and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield ("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
