"""Flags stored with the message (RFC 3501 section 2.3.2), seen by every session, through real sockets."""

from __future__ import annotations

import imaplib
import time
from typing import Any

import pytest
from imapclient import IMAPClient

from mailaccess.server import ServerThread
from mailboxes.models import Message
from mailboxes.tests.helpers import message_deliver, simple_message

pytestmark = pytest.mark.django_db(transaction=True)


def _client(server: ServerThread, world: Any) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", server.port, timeout=10)
    client.login(world.mailbox.address, world.owner_key)
    client.select("INBOX")
    return client


def _flags(client: imaplib.IMAP4, number: str) -> set[bytes]:
    _status, data = client.fetch(number, "(FLAGS)")
    line = data[0]
    assert isinstance(line, bytes)
    return set(line.split(b"FLAGS (")[1].rstrip(b"))").split())


def test_it_shows_deleted_to_every_session_and_expunges_it_from_any(imap_server: ServerThread, world: Any) -> None:
    for number in range(4):
        message_deliver(world.mailbox, simple_message(f"Message {number}"))
    one, two = _client(imap_server, world), _client(imap_server, world)
    one.store("2", "+FLAGS", "(\\Deleted)")
    assert _flags(two, "2") == {b"\\Deleted"}
    _status, data = two.search(None, "DELETED")
    assert data == [b"2"]
    one.logout()
    again = _client(imap_server, world)  # a reconnect sees the mark too
    assert _flags(again, "2") == {b"\\Deleted"}
    marked = Message.objects.get(mailbox=world.mailbox, uid=2)
    assert marked.imap_deleted and marked.deleted_at is None and marked.tags == []  # not an API tag
    _status, data = two.expunge()  # the other session's mark
    assert data == [b"2"]
    assert Message.objects.get(pk=marked.pk).deleted_at is not None
    again.noop()
    assert again.untagged_responses.pop("EXPUNGE") == [b"2"]
    again.store("2", "+FLAGS", "(\\Deleted)")  # UID 3 now
    again.store("2", "-FLAGS", "(\\Deleted)")
    assert _flags(two, "2") == set()
    again.store("3", "FLAGS", "(\\Deleted \\Seen)")  # UID 4
    again.logout()
    two.close()  # CLOSE removes what another session marked
    assert Message.objects.get(mailbox=world.mailbox, uid=4).deleted_at is not None
    assert Message.objects.get(mailbox=world.mailbox, uid=3).deleted_at is None
    two.logout()


def test_it_keeps_the_case_of_a_keyword_and_matches_it_case_insensitively(
    imap_server: ServerThread, world: Any
) -> None:
    message_deliver(world.mailbox, simple_message("Important"))
    one, two = _client(imap_server, world), _client(imap_server, world)
    one.store("1", "+FLAGS", "($Important \\Flagged)")
    assert _flags(two, "1") == {b"$Important", b"\\Flagged"}
    assert sorted(Message.objects.get(mailbox=world.mailbox, uid=1).tags) == ["$Important", "flagged"]
    one.store("1", "+FLAGS", "($IMPORTANT)")  # the same keyword: still one, in the case last used
    assert _flags(two, "1") == {b"$IMPORTANT", b"\\Flagged"}
    _status, data = two.search(None, "KEYWORD", "$important")
    assert data == [b"1"]
    one.store("1", "-FLAGS", "($important)")
    assert _flags(two, "1") == {b"\\Flagged"}
    one.logout()
    two.logout()


def test_it_tells_an_idle_client_when_another_changes_flags(imap_server: ServerThread, world: Any) -> None:
    message_deliver(world.mailbox, simple_message("First"))
    message_deliver(world.mailbox, simple_message("Second"))
    idler = IMAPClient("127.0.0.1", port=imap_server.port, ssl=False, timeout=10)
    idler.login(world.mailbox.address, world.owner_key)
    idler.select_folder("INBOX")
    idler.idle()
    time.sleep(0.3)  # the server is listening now
    other = _client(imap_server, world)
    other.store("2", "+FLAGS", "(\\Flagged $Later)")
    changed = time.monotonic()
    responses = idler.idle_check(timeout=3)
    elapsed = time.monotonic() - changed
    idler.idle_done()
    fetches = [response for response in responses if response[1] == b"FETCH"]
    assert [(seq, set(data[1])) for seq, _fetch, data in fetches] == [(2, {b"\\Flagged", b"$Later"})]
    assert elapsed < 1.0
    idler.logout()
    other.logout()
