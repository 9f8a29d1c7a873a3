"""IMAP and POP3 show a message only once its copy is settled, in ascending UID order.

Mail is stored as the drainer stores it, its parse (which verifies it) run here when the test
says, and read with IMAPClient and poplib over real sockets: a message not yet parsed is not
in SELECT, FETCH, SEARCH, STATUS, STAT, LIST or RETR, nor any message after it; it appears
(announced to IDLE and NOOP) with the bytes it keeps, our Authentication-Results first and the
forged one never served; one stuck unparsed is shown after a while without a verdict, and its
copy stays the same once its parse comes.
"""

from __future__ import annotations

import poplib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from imapclient import IMAPClient

from mailaccess.server import ServerThread
from mailboxes import authentication, blobs, pipeline
from mailboxes.models import Message
from mailboxes.presentation import UNVERIFIED_SHOWN_AFTER, messages_unverified_settle
from mailboxes.tests import authentication_helpers as helpers
from mailboxes.tests.helpers import message_store

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

FORGED = f"Authentication-Results: {helpers.OUR_ID}; spf=pass; dkim=pass header.d=forged.test; dmarc=pass\r\n"


@pytest.fixture
def zone(dns_zone: Any, settings: Any) -> Iterator[Any]:
    yield helpers.zone_prepare(dns_zone, settings)
    authentication.dns_cache_clear()


def _stored(world: Any, subject: str, *, forged: bool = False) -> Message:
    """Stored by the drainer from an SMTP envelope of origin.test, not parsed yet."""
    raw = (FORGED if forged else "").encode() + helpers.message(to=world.mailbox.address, subject=subject)
    message = message_store(world.mailbox, raw)
    Message.objects.filter(pk=message.pk).update(
        source="smtp", remote_ip="127.0.0.1", helo="mail.origin.test", mail_from="bounce@origin.test"
    )
    return message


def _parse(message: Message) -> Message:
    assert pipeline.message_parse(message_id=message.pk, index=True) == "indexed"
    message.refresh_from_db()
    return message


def _imap(server: ServerThread, world: Any) -> IMAPClient:
    client = IMAPClient("127.0.0.1", port=server.port, ssl=False, timeout=10)
    client.login(world.mailbox.address, world.owner_key)
    return client


def _pop(server: ServerThread, world: Any) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", server.port, timeout=10)
    client.user(world.mailbox.address)
    client.pass_(world.owner_key)
    return client


def _bodies(client: IMAPClient, uids: list[int]) -> dict[int, tuple[int, bytes]]:
    fetched = client.fetch(uids, ["RFC822.SIZE", "BODY.PEEK[]"])
    return {uid: (data[b"RFC822.SIZE"], data[b"BODY[]"]) for uid, data in fetched.items()}


def test_it_shows_a_message_only_once_verified_and_never_one_after_it_before(
    world: Any, zone: Any, imap_server: ServerThread, pop3_server: ServerThread
) -> None:
    first = _parse(_stored(world, "First"))
    forged = _stored(world, "Forged, parse late", forged=True)
    after = _parse(_stored(world, "Parsed before the one above"))
    assert (first.uid, forged.uid, after.uid) == (1, 2, 3)

    client = _imap(imap_server, world)
    selected = client.select_folder("INBOX")
    assert selected[b"EXISTS"] == 1
    assert selected[b"UIDNEXT"] == 2  # UID FETCH 2:* next time must find the late one
    assert client.folder_status("INBOX", ["MESSAGES", "UIDNEXT"]) == {b"MESSAGES": 1, b"UIDNEXT": 2}
    assert client.search() == [1]
    assert client.search(["SUBJECT", "Parsed before"]) == []
    assert client.fetch([2, 3], ["BODY.PEEK[]"]) == {}
    pop = _pop(pop3_server, world)
    assert pop.stat() == (1, first.size + first.authentication["presented"]["delta"])
    assert [line.split()[0] for line in pop.list()[1]] == [b"1"]
    with pytest.raises(poplib.error_proto):
        pop.retr(2)
    pop.quit()

    client.idle()
    _parse(forged)
    responses = client.idle_check(timeout=5)
    client.idle_done()
    assert (3, b"EXISTS") in responses  # both, announced by the late one's parse
    assert client.search() == [1, 2, 3]
    bodies = _bodies(client, [2, 3])
    size, data = bodies[2]
    assert data.startswith(forged.authentication["presented"]["field"].encode())
    assert FORGED.encode() not in data and b"forged.test" not in data
    assert size == len(data) == forged.size + forged.authentication["presented"]["delta"]
    client.logout()

    pop = _pop(pop3_server, world)
    assert pop.stat()[0] == 3
    _response, lines, _octets = pop.retr(2)
    assert b"\r\n".join(lines) + b"\r\n" == data
    pop.quit()


def test_it_shows_one_stuck_unparsed_after_a_while_and_keeps_that_copy(
    world: Any, zone: Any, imap_server: ServerThread, pop3_server: ServerThread
) -> None:
    stuck = _stored(world, "Stuck", forged=True)
    later = _parse(_stored(world, "Later"))
    client = _imap(imap_server, world)
    assert client.select_folder("INBOX")[b"EXISTS"] == 0
    assert messages_unverified_settle() == 0  # not stuck for long yet
    Message.objects.filter(pk=stuck.pk).update(created_at=timezone.now() - UNVERIFIED_SHOWN_AFTER - timedelta(1))
    assert messages_unverified_settle() == 1
    assert messages_unverified_settle() == 0  # once
    _text, responses = client.noop()
    assert (2, b"EXISTS") in responses
    raw = blobs.blob_get(stuck.storage_key)
    shown = _bodies(client, [1, 2])
    assert shown[1] == (len(raw) - len(FORGED), raw.replace(FORGED.encode(), b""))  # nothing put first

    # Its parse comes: the API gets the verdict, the client's copy stays the same.
    stuck = _parse(stuck)
    assert stuck.authentication_results.startswith(helpers.OUR_ID)
    assert stuck.authentication["presented"]["field"]  # the verdict's own, not served
    assert _bodies(client, [1, 2]) == shown
    assert 1 in client.search(["LARGER", str(shown[1][0] - 1)])  # the size of the copy served
    assert 1 not in client.search(["LARGER", str(shown[1][0])])
    assert shown[2][0] == len(shown[2][1]) and later.authentication["presented"]["field"] in shown[2][1].decode()
    client.logout()
    pop = _pop(pop3_server, world)
    _response, lines, _octets = pop.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == shown[1][1]
    pop.quit()


def test_it_lets_a_quarantined_or_deleted_message_hold_nothing_back(
    world: Any, imap_server: ServerThread, pop3_server: ServerThread
) -> None:
    blocked = _stored(world, "Quarantined before its parse")
    deleted = _stored(world, "Deleted before its parse")
    shown = _parse(_stored(world, "Shown"))
    pop = _pop(pop3_server, world)
    assert pop.stat()[0] == 0
    pop.quit()
    client = _imap(imap_server, world)
    client.select_folder("INBOX")
    client.idle()
    Message.objects.filter(pk=deleted.pk).update(state=Message.State.DELETED, deleted_at=timezone.now())
    assert pipeline.message_quarantine(message_id=blocked.pk, reason="a test")  # wakes the folder
    responses = client.idle_check(timeout=5)
    client.idle_done()
    assert (1, b"EXISTS") in responses
    assert client.search() == [shown.uid] == [3]
    assert client.folder_status("INBOX", ["UIDNEXT"])[b"UIDNEXT"] == 4
    client.logout()
    pop = _pop(pop3_server, world)
    assert pop.stat() == (1, shown.size)
    pop.quit()


def test_it_appends_verified_and_answers_with_a_uid_the_client_can_fetch(
    world: Any, zone: Any, imap_server: ServerThread
) -> None:
    client = _imap(imap_server, world)
    raw = FORGED.encode() + helpers.message(to=world.mailbox.address, subject="Appended")
    answer = client.append("INBOX", raw)
    assert answer.endswith(b" 1] APPEND completed")
    client.select_folder("INBOX")
    ((size, data),) = _bodies(client, [1]).values()
    message = Message.objects.get(mailbox=world.mailbox, uid=1)
    assert message.state == Message.State.INDEXED
    assert data.startswith(message.authentication["presented"]["field"].encode()) and FORGED.encode() not in data
    assert size == len(data)
    client.logout()


def test_it_backfills_old_verdicts_under_new_uids_so_no_copy_changes_under_its_uid(
    world: Any, zone: Any, imap_server: ServerThread
) -> None:
    import importlib

    from django.apps import apps

    from mailboxes.presentation import messages_presentation_backfill

    old = [_parse(_stored(world, subject, forged=True)) for subject in ("Old one", "Old two")]
    recent = _parse(_stored(world, "Recent"))
    old.append(_parse(_stored(world, "Old three")))
    for message in old:  # verdicts stored before IMAP presented them
        verdict = {key: value for key, value in message.authentication.items() if key != "presented"}
        Message.objects.filter(pk=message.pk).update(authentication=verdict)
    client = _imap(imap_server, world)
    client.select_folder("INBOX")
    before = _bodies(client, [1, 2, 3, 4])
    assert before[1][1] == blobs.blob_get(old[0].storage_key)  # served as stored until now

    assert messages_presentation_backfill(batch=2) == 3
    _text, responses = client.noop()
    assert responses == [(4, b"EXPUNGE"), (2, b"EXPUNGE"), (1, b"EXPUNGE"), (4, b"EXISTS")]
    assert client.search() == [3, 5, 6, 7]  # the recent one kept its UID; the others, in order, anew
    renumbered = {message.subject: message for message in Message.objects.filter(pk__in=[m.pk for m in old])}
    assert [renumbered[subject].uid for subject in ("Old one", "Old two", "Old three")] == [5, 6, 7]
    after = _bodies(client, [3, 5, 6, 7])
    assert after[3] == before[3]
    for uid, message in zip((5, 6, 7), old, strict=True):
        size, data = after[uid]
        field = renumbered[message.subject].authentication["presented"]["field"]
        assert data.startswith(field.encode()) and FORGED.encode() not in data and size == len(data)
    assert recent.uid == 3
    # The migration runs the same backfill with its models, and there is nothing left to do.
    migration = importlib.import_module("mailboxes.migrations.0016_verdicts_presentation_backfill")
    migration.backfill(apps, None)
    assert _bodies(client, [3, 5, 6, 7]) == after
    assert Message.objects.get(pk=old[0].pk).uid == 5
    client.logout()
