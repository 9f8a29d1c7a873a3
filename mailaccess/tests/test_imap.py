"""The IMAP server through real sockets, with imaplib and imapclient."""

from __future__ import annotations

import imaplib
import socket
import threading
import time
import tracemalloc
from typing import Any

import pytest
from imapclient import IMAPClient

from audit.models import AuditEntry, Event
from mailaccess.server import ServerThread
from mailboxes.models import Message
from mailboxes.tests.helpers import fixture_bytes, message_deliver, simple_message
from tenants.models import ApiKey
from tenants.services import api_key_revoke

pytestmark = pytest.mark.django_db(transaction=True)

NESTED = fixture_bytes("nested_multipart.eml").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _client(server: ServerThread, world: Any, secret: str | None = None, address: str | None = None) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", server.port, timeout=10)
    client.login(address or world.mailbox.address, secret or world.owner_key)
    return client


def test_it_selects_and_fetches_what_is_stored(imap_server: ServerThread, world: Any) -> None:
    first = message_deliver(world.mailbox, simple_message("First"))
    message_deliver(world.mailbox, NESTED)
    client = imaplib.IMAP4("127.0.0.1", imap_server.port, timeout=10)
    capabilities = client.capabilities
    assert {"IMAP4REV1", "IDLE", "UIDPLUS", "MOVE", "NAMESPACE", "ENABLE", "ID", "LITERAL+"} <= set(capabilities)
    client.login(world.mailbox.address, world.owner_key)
    status, folders = client.list()
    names = {line.decode().rsplit(" ", 1)[1].strip('"') for line in folders}  # type: ignore[union-attr]
    assert names == {"INBOX", world.sibling.address}  # a tenant-wide key: the tenant's mailboxes
    status, data = client.select("INBOX")
    assert status == "OK" and data == [b"2"]
    world.mailbox.refresh_from_db()
    assert client.untagged_responses["UIDVALIDITY"] == [str(world.mailbox.uid_validity).encode()]
    status, data = client.uid("FETCH", "1:*", "(FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)")
    assert status == "OK"
    head = data[0][0] if isinstance(data[0], tuple) else data[0]
    assert b"UID 1 " in head and b"RFC822.SIZE %d" % first.size in head and b"FLAGS ()" in head
    assert b'"First"' in head and b'(("Alice" NIL "alice" "sender.example"))' in head
    status, data = client.fetch("2", "(BODY.PEEK[])")
    assert data[0][1] == NESTED  # type: ignore[index]
    assert not Message.objects.get(mailbox=world.mailbox, uid=2).is_read
    status, data = client.fetch("1", "(BODY[TEXT])")
    assert data[0][1] == b"Body text\r\n" and b"\\Seen" in data[1]  # type: ignore[index,operator]
    assert Message.objects.get(pk=first.pk).is_read
    client.logout()


def test_it_answers_bodystructure_and_sections_of_nested_multipart(imap_server: ServerThread, world: Any) -> None:
    message_deliver(world.mailbox, NESTED)
    client = _client(imap_server, world)
    client.select("INBOX", readonly=True)
    _status, data = client.fetch("1", "(BODYSTRUCTURE)")
    structure = data[0]
    assert structure == (
        b'1 (BODYSTRUCTURE (((("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 17 0 NIL NIL NIL NIL)'
        b'("TEXT" "HTML" ("CHARSET" "us-ascii") NIL NIL "7BIT" 41 0 NIL NIL NIL NIL) "ALTERNATIVE" '
        b'("BOUNDARY" "alt") NIL NIL NIL)("IMAGE" "PNG" NIL "<logo@x>" NIL "BASE64" 96 NIL '
        b'("INLINE" ("FILENAME" "logo.png")) NIL NIL) "RELATED" ("BOUNDARY" "rel") NIL NIL NIL)'
        b'("APPLICATION" "PDF" ("NAME" "report.pdf") NIL NIL "BASE64" 36 NIL ("ATTACHMENT" '
        b'("FILENAME" "report.pdf")) NIL NIL) "MIXED" ("BOUNDARY" "mix") NIL NIL NIL))'
    )
    sections = {
        "1.1.1": b"Nested plain text",
        "1.1.2": b'<p>Nested <img src="cid:logo@x"> html</p>',
        "2": b"JVBERi0xLjQgcXVhcnRlcmx5IHJlcG9ydA==",
        "1.1.1.MIME": b"Content-Type: text/plain\r\n\r\n",
        "2.MIME": b'Content-Type: application/pdf; name="report.pdf"\r\n'
        b'Content-Disposition: attachment; filename="report.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n',
        "HEADER.FIELDS (SUBJECT FROM)": (
            b"From: Alice Example <alice@sender.example>\r\nSubject: Nested multiparts\r\n\r\n"
        ),
    }
    for section, expected in sections.items():
        _status, data = client.fetch("1", f"(BODY.PEEK[{section}])")
        assert data[0][1] == expected, section  # type: ignore[index]
    _status, data = client.fetch("1", "(BODY.PEEK[2]<4.10>)")
    assert data[0][0].endswith(b"BODY[2]<4> {10}") and data[0][1] == b"Ri0xLjQgcX"  # type: ignore[index]
    _status, data = client.fetch("1", "(BODY.PEEK[HEADER])")
    assert data[0][1] == NESTED.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"  # type: ignore[index]
    client.logout()


def test_it_shares_flags_and_expunges_between_two_clients(imap_server: ServerThread, world: Any) -> None:
    for number in range(3):
        message_deliver(world.mailbox, simple_message(f"Message {number}"))
    one, two = _client(imap_server, world), _client(imap_server, world)
    one.select("INBOX")
    two.select("INBOX")
    one.store("1", "+FLAGS", "(\\Seen \\Flagged $Work)")
    _status, data = two.fetch("1", "(FLAGS)")
    assert set(data[0].split(b"FLAGS (")[1].rstrip(b"))").split()) == {b"\\Seen", b"\\Flagged", b"$Work"}  # type: ignore[union-attr]
    message = Message.objects.get(mailbox=world.mailbox, uid=1)
    assert message.is_read and set(message.tags) == {"flagged", "$Work"}
    one.store("2", "+FLAGS", "(\\Deleted)")
    _status, data = one.expunge()
    assert data == [b"2"]
    deleted = Message.objects.get(mailbox=world.mailbox, uid=2)
    assert deleted.deleted_at is not None
    assert Event.objects.filter(message_id=deleted.pk, type="message.deleted").exists()
    two.noop()
    assert two.untagged_responses.pop("EXPUNGE") == [b"2"]
    _status, data = two.search(None, "ALL")
    assert data == [b"1 2"]
    _status, data = two.uid("SEARCH", None, "ALL")  # type: ignore[arg-type]
    assert data == [b"1 3"]
    one.logout()
    two.logout()


def test_it_shows_a_scoped_key_only_its_mailbox(imap_server: ServerThread, world: Any) -> None:
    message_deliver(world.sibling, simple_message("For the sibling"))
    scoped = world.key(["messages:read"], mailboxes=[world.sibling])
    client = _client(imap_server, world, scoped, world.sibling.address)
    _status, folders = client.list()
    assert folders == [b'(\\HasNoChildren) "/" "INBOX"']
    with pytest.raises(imaplib.IMAP4.readonly):  # messages:read only: SELECT answers READ-ONLY
        client.select("INBOX")
    client.shutdown()
    sock = socket.create_connection(("127.0.0.1", imap_server.port), timeout=10)
    sock.sendall(
        f"a LOGIN {world.sibling.address} {scoped}\r\nb SELECT INBOX\r\nc STORE 1 +FLAGS (\\Seen)\r\n".encode()
    )
    answer = b""
    while b"\r\nc " not in answer:
        answer += sock.recv(65536)
    sock.close()
    assert b"c NO [READ-ONLY]" in answer
    assert not Message.objects.get(mailbox=world.sibling).is_read
    with pytest.raises(imaplib.IMAP4.error):
        _client(imap_server, world, scoped, world.mailbox.address)  # not among its grants


def test_it_refuses_and_audits_a_wrong_password_and_a_revoked_key(imap_server: ServerThread, world: Any) -> None:
    secret = world.key(["messages:read"], name="soon revoked")
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        _client(imap_server, world, "mp_wrong", world.mailbox.address)
    _client(imap_server, world, secret).logout()
    from tenants.access import Principal

    api_key_revoke(principal=Principal.system(world.tenant), api_key=ApiKey.objects.get(name="soon revoked"))
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        _client(imap_server, world, secret)
    reasons = [entry.after["reason"] for entry in AuditEntry.objects.filter(action="mailaccess.login_failed")]
    assert reasons == ["invalid_api_key", "api_key_revoked"] or sorted(reasons) == [
        "api_key_revoked",
        "invalid_api_key",
    ]


def test_it_tells_an_idle_client_about_a_new_message_within_a_second(imap_server: ServerThread, world: Any) -> None:
    client = IMAPClient("127.0.0.1", port=imap_server.port, ssl=False, timeout=10)
    client.login(world.mailbox.address, world.owner_key)
    client.select_folder("INBOX")
    client.idle()
    time.sleep(0.3)  # the server is listening now
    message_deliver(world.mailbox, simple_message("While idling"))
    indexed = time.monotonic()
    responses = client.idle_check(timeout=3)
    elapsed = time.monotonic() - indexed
    client.idle_done()
    assert (1, b"EXISTS") in responses
    assert elapsed < 1.0
    client.logout()


def test_it_appends_through_accept_and_answers_appenduid(imap_server: ServerThread, world: Any) -> None:
    client = IMAPClient("127.0.0.1", port=imap_server.port, ssl=False, timeout=10)
    client.login(world.mailbox.address, world.owner_key)
    raw = simple_message("Appended")
    answer = client.append("INBOX", raw, flags=[b"\\Seen"])
    world.mailbox.refresh_from_db()
    assert answer.startswith(b"[APPENDUID %d 1]" % world.mailbox.uid_validity)
    message = Message.objects.get(mailbox=world.mailbox, uid=1)
    assert message.source == Message.Source.IMAP and message.is_read and message.size == len(raw)
    client.select_folder("INBOX")
    assert client.fetch([1], ["BODY.PEEK[]"])[1][b"BODY[]"] == raw
    client.move([1], world.sibling.address)
    assert client.search() == []  # the source copy is expunged (RFC 6851)
    assert Message.objects.get(pk=message.pk).deleted_at is not None
    moved = Message.objects.get(mailbox=world.sibling, deleted_at__isnull=True)
    assert moved.uid == 1 and moved.is_read and moved.size == len(raw)  # flags go with it
    client.logout()


def _expunge_one_and_move_one(server: ServerThread, world: Any) -> tuple[Message, Message]:
    for number in range(3):
        message_deliver(world.mailbox, simple_message(f"Message {number}"))
    client = IMAPClient("127.0.0.1", port=server.port, ssl=False, timeout=10)
    client.login(world.mailbox.address, world.owner_key)
    client.select_folder("INBOX")
    client.add_flags([1], [b"\\Deleted"])
    client.expunge()
    client.move([3], world.sibling.address)
    client.logout()
    expunged, moved = (Message.objects.get(mailbox=world.mailbox, uid=uid) for uid in (1, 3))
    return expunged, moved


def test_it_records_expunge_and_move_as_done_over_imap(imap_server: ServerThread, world: Any) -> None:
    expunged, moved = _expunge_one_and_move_one(imap_server, world)
    assert expunged.deleted_at is not None and moved.deleted_at is not None
    assert (expunged.state_reason, moved.state_reason) == ("expunged over IMAP", "moved over IMAP")
    events = Event.objects.filter(type="message.deleted")
    assert {event.message_id: event.data["reason"] for event in events} == {
        expunged.pk: "expunged over IMAP",
        moved.pk: "moved over IMAP",
    }


def test_it_audits_an_imap_sessions_writes_as_from_the_clients_address(imap_server: ServerThread, world: Any) -> None:
    expunged, moved = _expunge_one_and_move_one(imap_server, world)
    deletions = AuditEntry.objects.filter(tenant=world.tenant, action="message.delete")
    assert sorted(entry.resource_id for entry in deletions) == sorted([str(expunged.pk), str(moved.pk)])
    # Every write of the session (the \\Deleted flag, the deletions) names the client's address.
    entries = AuditEntry.objects.filter(tenant=world.tenant, action__in=["message.update", "message.delete"])
    assert entries.count() >= 3
    assert {(entry.ip, entry.user_agent) for entry in entries} == {("127.0.0.1", "imap")}
    assert len({entry.correlation_id for entry in entries}) == 1 and entries[0].correlation_id  # one session


def test_it_streams_a_20_mb_message_with_bounded_memory(imap_server: ServerThread, world: Any) -> None:
    line = b"x" * 998 + b"\r\n"
    raw = simple_message("Large") + line * (20 * 1024 * 1024 // len(line))
    message_deliver(world.mailbox, raw)
    del raw
    sock = socket.create_connection(("127.0.0.1", imap_server.port), timeout=20)
    reader = sock.makefile("rb")
    reader.readline()
    tracemalloc.start()
    try:
        sock.sendall(f"a LOGIN {world.mailbox.address} {world.owner_key}\r\nb SELECT INBOX\r\n".encode())
        sock.sendall(b"c FETCH 1 (BODY.PEEK[])\r\n")
        received = 0
        while True:
            chunk = reader.readline(65536)
            received += len(chunk)
            if chunk.startswith(b"c OK") or not chunk:
                break
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    sock.close()
    assert received > 20 * 1024 * 1024
    assert peak < 8 * 1024 * 1024, peak


def test_it_refuses_plaintext_login_from_outside_loopback(world: Any, settings: Any) -> None:
    from mailaccess.imap import ImapOptions, ImapSession

    class Writer:
        def get_extra_info(self, name: str) -> Any:
            return ("192.0.2.10", 4000)

    session = ImapSession(None, Writer(), ImapOptions(tls_context=None))  # type: ignore[arg-type]
    assert b"LOGINDISABLED" in session.capabilities()
    settings.MAILACCESS_ALLOW_PLAINTEXT = True
    assert b"LOGINDISABLED" not in session.capabilities()
    threading.Event()  # keep the import used


def test_it_shuts_down_on_ctrl_c_with_a_client_in_idle_without_logging_an_error(world: Any) -> None:
    """runimap stopped by SIGINT while a client idles (and another sits at the prompt): the
    sessions end with the server, and nothing is logged as an error."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from django.db import connection

    db = connection.settings_dict
    host = f"{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}"
    url = (
        f"postgres://{db.get('USER') or 'postgres'}@{host}/{db['NAME']}"
        if connection.vendor == "postgresql"
        else f"sqlite:///{db['NAME']}"
    )
    process = subprocess.Popen(
        [sys.executable, "manage.py", "runimap", "--host", "127.0.0.1", "--port", "0", "--tls-port", "0"],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "INFO", "PYTHONASYNCIODEBUG": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        ready = process.stdout.readline().decode()
        assert ready.startswith("imap ready on "), ready
        port = int(ready.split()[-1])
        idling = IMAPClient("127.0.0.1", port=port, ssl=False, timeout=10)
        idling.login(world.mailbox.address, world.owner_key)
        idling.select_folder("INBOX")
        idling.idle()
        waiting = IMAPClient("127.0.0.1", port=port, ssl=False, timeout=10)
        waiting.login(world.mailbox.address, world.owner_key)
        time.sleep(0.5)  # both sessions are waiting for their client now
        process.send_signal(signal.SIGINT)
        _out, errors = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = errors.decode()
    assert process.returncode == 0, text
    for sign in ("ERROR", "Traceback", "never retrieved", "CancelledError", "Exception"):
        assert sign not in text, text
