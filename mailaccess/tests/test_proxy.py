"""PROXY protocol from a trusted balancer: the client's address is the header's."""

from __future__ import annotations

import imaplib
import socket
from typing import Any

import pytest

from audit.models import AuditEntry
from mailaccess.server import ServerThread
from mailboxes.tests.helpers import message_deliver, simple_message

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


class _ProxiedImap(imaplib.IMAP4):
    """imaplib through a balancer that speaks PROXY protocol v1 for the client 192.0.2.7."""

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = super()._create_socket(timeout)  # type: ignore[misc]
        sock.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 143\r\n")
        return sock


def test_it_audits_a_proxied_sessions_writes_as_from_the_clients_address(world: Any, settings: Any) -> None:
    settings.MAILACCESS_PROXY_PROTOCOL = True
    settings.MAILACCESS_TRUSTED_PROXIES = ["127.0.0.1/32"]
    settings.MAILACCESS_ALLOW_PLAINTEXT = True  # 192.0.2.7 is not loopback; no TLS in this test
    message = message_deliver(world.mailbox, simple_message("Behind a balancer"))
    server = ServerThread("imap").start()
    try:
        client = _ProxiedImap("127.0.0.1", server.port, timeout=10)
        client.login(world.mailbox.address, world.owner_key)
        client.select("INBOX")
        client.store("1", "+FLAGS", "(\\Deleted)")
        client.expunge()
        client.logout()
    finally:
        server.stop()
    entry = AuditEntry.objects.get(tenant=world.tenant, action="message.delete", resource_id=str(message.pk))
    assert entry.ip == "192.0.2.7"
