"""PROXY protocol: the header is believed only from SMTP_TRUSTED_PROXIES (real sockets)."""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

import pytest

from mailplatform.testing import ROOT, env_with

pytestmark = pytest.mark.django_db

BODY = b"From: a@example.org\r\nSubject: hello\r\n\r\nHello.\r\n"
FORGED = (
    b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\nEHLO x\r\nMAIL FROM:<a@example.org>\r\n"
    b"RCPT TO:<inbox@acme.example.test>\r\nDATA\r\n" + BODY + b".\r\nQUIT\r\n"
)


def received(port: int, payload: bytes) -> bytes:
    """Everything the server says to ``payload`` until it hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:  # closed with our unread bytes in its buffer: a reset
            pass
    return answer


def test_it_disconnects_a_peer_that_is_not_a_trusted_proxy_before_the_greeting(world: Any, smtp_server: Any) -> None:
    smtp_server.proxy_timeout = 5.0
    smtp_server.trusted_proxies = ["192.0.2.0/24", "2001:db8::/32"]  # the balancers; we are 127.0.0.1
    server = smtp_server()
    assert received(server.port, FORGED) == b""  # no greeting, no reply: the header is not believed
    assert server.spool.pending() == []


def test_it_believes_the_header_from_a_trusted_proxy(world: Any, smtp_server: Any) -> None:
    smtp_server.proxy_timeout = 5.0
    smtp_server.trusted_proxies = ["127.0.0.1"]
    server = smtp_server()
    assert b"250 2.0.0 Ok: queued as" in received(server.port, FORGED)
    envelope, _ = server.spool.read(server.spool.pending()[0])
    assert envelope.remote_ip == "203.0.113.7"


def test_it_refuses_to_start_the_proxy_protocol_without_trusted_proxies() -> None:
    env = env_with(SMTP_PROXY_PROTOCOL="true", SMTP_TRUSTED_PROXIES="")
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "SMTP_TRUSTED_PROXIES" in result.stderr
