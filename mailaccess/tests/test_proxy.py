"""PROXY protocol from a trusted balancer: the client's address is the header's."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from mailaccess.server import ServerThread

pytestmark = pytest.mark.django_db(transaction=True)


def _greeting(port: int, header: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(header)
        try:
            return sock.recv(4096)
        except ConnectionResetError:  # closed with our bytes unread
            return b""


def test_it_believes_a_proxy_header_only_from_a_trusted_balancer(world: Any, settings: Any) -> None:
    settings.MAILACCESS_PROXY_PROTOCOL = True
    settings.MAILACCESS_TRUSTED_PROXIES = ["127.0.0.1/32"]
    servers = [ServerThread("imap").start(), ServerThread("pop3").start()]
    try:
        imap, pop3 = servers
        header = b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 143\r\n"
        greeting = _greeting(imap.port, header)
        # The client is 192.0.2.7, not loopback: no password over plaintext.
        assert greeting.startswith(b"* OK [CAPABILITY") and b"LOGINDISABLED" in greeting
        assert _greeting(pop3.port, header).startswith(b"+OK")
        assert _greeting(imap.port, b"a CAPABILITY\r\n") == b""  # no header: closed, no greeting
        settings.MAILACCESS_TRUSTED_PROXIES = ["10.0.0.0/8"]
        assert _greeting(imap.port, header) == b""  # a header from an untrusted peer is never believed
    finally:
        for server in servers:
            server.stop()
