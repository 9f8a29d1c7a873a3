"""Connectors over TLS against a real Dovecot with a self-signed certificate: implicit TLS and
STARTTLS log in and fetch when the certificate is trusted (``OUTBOUND_CA_FILE``), are refused
when it cannot be verified, and STARTTLS not offered by the server stops before any credential.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from ingest.models import Connector
from ingest.tests import test_connectors_runner
from ingest.tests.test_connectors_runner import connector_for, imap_messages, message, wait_until

# The runner fixtures of the runner tests (the runner in this process, on the test database).
runner_settings = test_connectors_runner.runner_settings
start_runner = test_connectors_runner.start_runner


@pytest.fixture(scope="module")
def tls_dovecot() -> Iterator[Any]:
    """Dovecot with a self-signed certificate: implicit TLS on ``tls_port``, STARTTLS on ``port``."""
    from ingest.tests.dovecot import start_dovecot

    server = start_dovecot(tls=True, oauth=False, accounts=10)
    yield server
    server.stop()


class Recorder:
    """A loopback relay to ``port`` that keeps every byte the client sent."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.sent = bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if record:
                    self.sent += chunk
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def connector_state(connector: Connector) -> Connector:
    return Connector.objects.get(pk=connector.pk)


def connector_idle(connector: Connector) -> bool:
    return connector_state(connector).state == Connector.State.IDLE


def connector_tls_refused(connector: Connector) -> bool:
    return connector_state(connector).last_error_kind == "tls"


def test_it_fetches_over_implicit_tls_and_starttls_when_the_certificate_is_trusted(
    world, tls_dovecot, start_runner, runner_settings
):
    runner_settings.OUTBOUND_CA_FILE = str(tls_dovecot.certificate)
    implicit_account, starttls_account = tls_dovecot.account_new(), tls_dovecot.account_new()
    first, second = message(1, subject="over implicit TLS"), message(2, subject="over STARTTLS, a bit longer")
    implicit_account.save(first)
    starttls_account.save(second)
    implicit = connector_for(
        world, tls_dovecot, implicit_account, port=tls_dovecot.tls_port, tls_mode=Connector.TlsMode.IMPLICIT
    )
    starttls = connector_for(world, tls_dovecot, starttls_account, tls_mode=Connector.TlsMode.STARTTLS)
    start_runner()
    wait_until(lambda: len(imap_messages(world.mailbox)) == 2)
    assert sorted(m.size for m in imap_messages(world.mailbox)) == sorted([len(first), len(second)])
    for connector in (implicit, starttls):
        wait_until(functools.partial(connector_idle, connector))
        assert connector_state(connector).last_error == ""
    # The sessions stay up over TLS: new mail comes through IDLE on both.
    implicit_account.save(message(3))
    starttls_account.save(message(4))
    wait_until(lambda: len(imap_messages(world.mailbox)) == 4, timeout=3)
    logins = [line for line in tls_dovecot.log_text().splitlines() if "imap-login: Info: Login:" in line]
    for account in (implicit_account, starttls_account):  # logged in, and over TLS
        assert [line for line in logins if f"user=<{account.username}>" in line and ", TLS" in line]


def test_it_refuses_a_certificate_it_cannot_verify_in_both_modes(world, tls_dovecot, start_runner, runner_settings):
    runner_settings.OUTBOUND_CA_FILE = ""  # the system CAs only: the self-signed certificate is unknown
    accounts = [tls_dovecot.account_new(), tls_dovecot.account_new()]
    for account in accounts:
        account.save(message(1))
    connectors = [
        connector_for(world, tls_dovecot, accounts[0], port=tls_dovecot.tls_port, tls_mode=Connector.TlsMode.IMPLICIT),
        connector_for(world, tls_dovecot, accounts[1], tls_mode=Connector.TlsMode.STARTTLS),
    ]
    start_runner()
    for connector in connectors:
        wait_until(functools.partial(connector_tls_refused, connector))
        refused = connector_state(connector)
        assert refused.state == Connector.State.BACKOFF
        assert "certificate verify failed" in refused.last_error
    assert imap_messages(world.mailbox) == []
    log = tls_dovecot.log_text()
    for account in accounts:  # never logged in: the credentials stayed with the connector
        assert f"user=<{account.username}>" not in log


def test_it_refuses_starttls_the_server_does_not_offer_before_any_credential(
    world, dovecot, imap_account, start_runner
):
    """The session Dovecot has no TLS at all, so it does not offer STARTTLS."""
    imap_account.save(message(1))
    recorder = Recorder(dovecot.port)
    try:
        connector = connector_for(world, dovecot, imap_account, port=recorder.port, tls_mode=Connector.TlsMode.STARTTLS)
        start_runner()
        wait_until(functools.partial(connector_tls_refused, connector))
        refused = connector_state(connector)
        assert refused.state == Connector.State.BACKOFF
        assert "does not offer STARTTLS" in refused.last_error
        sent = bytes(recorder.sent).upper()
        assert b"CAPABILITY" in sent  # it asked, then stopped
        assert imap_account.password.upper().encode() not in sent
        assert imap_account.username.upper().encode() not in sent
        assert b"LOGIN" not in sent and b"AUTHENTICATE" not in sent and b"STARTTLS" not in sent
        assert imap_messages(world.mailbox) == []
    finally:
        recorder.close()
