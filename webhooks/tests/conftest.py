"""Webhook test support: real HTTP receivers on loopback, a controllable clock, helpers."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from webhooks import clock


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Scripted:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    delay: float = 0.0
    hang_up: bool = False  # keep-alive receivers: close after this answer without saying so


class Receiver:
    """A threaded HTTP server that records every request and answers from a script."""

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None, keep_alive: bool = False) -> None:
        self.received: list[Received] = []
        self.connections = 0  # TCP connections accepted
        self.script: deque[Scripted] = deque()
        self.condition = threading.Condition()
        self.host = host
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with receiver.condition:
                    receiver.connections += 1

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with receiver.condition:
                    receiver.received.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
                    )
                    answer = receiver.script.popleft() if receiver.script else Scripted()
                    receiver.condition.notify_all()
                if answer.delay:
                    time.sleep(answer.delay)
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(answer.body)))
                    if not keep_alive:
                        self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(answer.body)
                    if answer.hang_up:
                        self.close_connection = True
                except OSError:
                    pass  # the client gave up (timeout tests)

            do_POST = do_GET = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.server = Server((host, 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook", host: str | None = None) -> str:
        host = host or self.host
        return f"{self.scheme}://{'[' + host + ']' if ':' in host else host}:{self.port}{path}"

    def respond(self, *answers: Scripted) -> None:
        with self.condition:
            self.script.extend(answers)

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self.condition:
            while len(self.received) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"expected {count} requests, got {len(self.received)}")
                self.condition.wait(remaining)
            return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def frozen_clock() -> Iterator[Any]:
    clock.freeze()
    yield clock
    clock.reset()


def verify(secret: str, request: Received) -> dict[str, Any]:
    """Verify a received request with the official standardwebhooks package."""
    result = Webhook(secret).verify(request.body, request.headers)
    assert isinstance(result, dict)
    return result


def make_endpoint(world: Any, url: str, **options: Any) -> tuple[Any, str]:
    from tenants.access import Principal
    from webhooks.services import endpoint_create

    return endpoint_create(principal=Principal.system(world.tenant), url=url, **options)


def record(world: Any, type: str = "ingest.received", *, mailbox: Any = None, **data: Any) -> Any:
    """Record an event about ``mailbox`` (default: world.mailbox) in tenant A."""
    from audit.services import event_record

    mailbox = world.mailbox if mailbox is None else mailbox
    return event_record(
        tenant_id=mailbox.tenant_id,
        type=type,
        data=data,
        domain_id=mailbox.domain_id,
        mailbox_id=mailbox.pk,
    )


def self_signed_certificate(directory: Any, name: str = "localhost") -> tuple[str, str]:
    """A certificate for ``name`` only (no IP address in it) and its key, as PEM files."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = f"{directory}/cert.pem", f"{directory}/key.pem"
    with open(cert_path, "wb") as handle:
        handle.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cert_path, key_path


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def loopback_receivers() -> Iterator[list[Receiver]]:
    """A receiver on 127.0.0.1 and, where the machine has it, one on ::1 (for SSRF matrices)."""
    servers = [Receiver("127.0.0.1")]
    if has_ipv6_loopback():
        servers.append(Receiver("::1"))
    yield servers
    for server in servers:
        server.close()
