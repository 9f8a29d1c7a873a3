"""The POP3 server through real sockets, with poplib."""

from __future__ import annotations

import poplib
from typing import Any

import pytest

from audit.models import AuditEntry, Event
from mailaccess.server import ServerThread
from mailboxes.models import Message
from mailboxes.tests.helpers import message_deliver, simple_message

pytestmark = pytest.mark.django_db(transaction=True)


def _pop(server: ServerThread, world: Any, secret: str | None = None) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", server.port, timeout=10)
    client.user(world.mailbox.address)
    client.pass_(secret or world.owner_key)
    return client


def test_it_lists_retrieves_and_deletes_like_rfc_1939(pop3_server: ServerThread, world: Any) -> None:
    dotted = simple_message("Dots", body="first line\r\n.starts with a dot\r\n..two dots")
    messages = [message_deliver(world.mailbox, raw) for raw in (simple_message("One"), dotted)]
    client = poplib.POP3("127.0.0.1", pop3_server.port, timeout=10)
    capabilities = client.capa()
    assert {"TOP", "UIDL", "USER"} <= set(capabilities)
    client.user(world.mailbox.address)
    client.pass_(world.owner_key)
    assert client.stat() == (2, sum(message.size for message in messages))
    assert client.list()[1] == [b"1 %d" % messages[0].size, b"2 %d" % messages[1].size]
    world.mailbox.refresh_from_db()
    assert client.uidl()[1] == [b"1 %d.1" % world.mailbox.uid_validity, b"2 %d.2" % world.mailbox.uid_validity]
    _response, lines, _octets = client.retr(2)
    assert b"\r\n".join(lines) + b"\r\n" == dotted  # poplib undoes the byte-stuffing
    _response, lines, _octets = client.top(1, 0)
    assert lines[-1] == b"" and b"Subject: One" in lines
    client.dele(1)
    assert client.stat()[0] == 1
    client.rset()
    assert client.stat()[0] == 2
    client.dele(1)
    client.quit()
    first = Message.objects.get(pk=messages[0].pk)
    assert first.deleted_at is not None  # at QUIT, through the API's soft delete
    assert Event.objects.filter(message_id=first.pk, type="message.deleted").exists()
    again = _pop(pop3_server, world)
    assert again.stat() == (1, messages[1].size)
    assert again.uidl(1).endswith(b".2")  # the same unique-id as before
    again.quit()


def test_it_records_dele_as_done_over_pop3(pop3_server: ServerThread, world: Any) -> None:
    message = message_deliver(world.mailbox, simple_message("Delete me"))
    client = _pop(pop3_server, world)
    client.dele(1)
    client.quit()
    message.refresh_from_db()
    assert message.deleted_at is not None and message.state_reason == "deleted over POP3"
    event = Event.objects.get(message_id=message.pk, type="message.deleted")
    assert event.data["reason"] == "deleted over POP3"


def test_it_audits_a_pop3_deletion_as_from_the_clients_address(pop3_server: ServerThread, world: Any) -> None:
    message = message_deliver(world.mailbox, simple_message("Delete me"))
    client = _pop(pop3_server, world)
    client.dele(1)
    client.quit()
    entry = AuditEntry.objects.get(tenant=world.tenant, action="message.delete", resource_id=str(message.pk))
    assert (entry.ip, entry.user_agent) == ("127.0.0.1", "pop3") and entry.correlation_id


def test_it_refuses_a_wrong_password_and_deletion_without_write(pop3_server: ServerThread, world: Any) -> None:
    message_deliver(world.mailbox, simple_message("Keep me"))
    with pytest.raises(poplib.error_proto, match="AUTH"):
        _pop(pop3_server, world, "not-a-token")
    reader = _pop(pop3_server, world, world.key(["messages:read"]))
    with pytest.raises(poplib.error_proto):
        reader.dele(1)
    reader.quit()
    assert Message.objects.get(mailbox=world.mailbox).deleted_at is None
