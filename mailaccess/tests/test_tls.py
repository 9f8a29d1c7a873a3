"""STARTTLS (IMAP), STLS (POP3) and implicit TLS with the SMTP certificate settings."""

from __future__ import annotations

import datetime
import imaplib
import poplib
import ssl
from pathlib import Path
from typing import Any

import pytest

from mailaccess.server import ServerThread
from mailboxes.tests.helpers import message_deliver, simple_message

pytestmark = pytest.mark.django_db(transaction=True)


def _certificate(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imap.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "cert.pem", folder / "key.pem"


def test_it_speaks_starttls_stls_and_implicit_tls(world: Any, settings: Any, tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    settings.SMTP_TLS_CERT_FILE, settings.SMTP_TLS_KEY_FILE = str(cert), str(key)
    settings.MAILACCESS_TLS_CERT_FILE, settings.MAILACCESS_TLS_KEY_FILE = str(cert), str(key)
    raw = simple_message("Over TLS")
    message_deliver(world.mailbox, raw)
    trusting = ssl.create_default_context(cafile=str(cert))
    trusting.check_hostname = False
    servers = [ServerThread(name).start() for name in ("imap", "pop3")] + [
        ServerThread("imap", implicit_tls=True).start()
    ]
    imap, pop3, imaps = servers
    try:
        client = imaplib.IMAP4("127.0.0.1", imap.port, timeout=10)
        assert "STARTTLS" in client.capabilities
        client.starttls(ssl_context=trusting)
        assert "STARTTLS" not in client.capabilities
        client.login(world.mailbox.address, world.owner_key)
        client.select("INBOX")
        assert client.fetch("1", "(BODY.PEEK[])")[1][0][1] == raw  # type: ignore[index]
        client.logout()
        pop = poplib.POP3("127.0.0.1", pop3.port, timeout=10)
        assert "STLS" in pop.capa()
        pop.stls(context=trusting)
        pop.user(world.mailbox.address)
        pop.pass_(world.owner_key)
        assert pop.stat()[0] == 1
        pop.quit()
        secure = imaplib.IMAP4_SSL("127.0.0.1", imaps.port, ssl_context=trusting, timeout=10)
        assert "STARTTLS" not in secure.capabilities
        secure.login(world.mailbox.address, world.owner_key)
        secure.logout()
    finally:
        for server in servers:
            server.stop()
