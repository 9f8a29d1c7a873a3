"""What a mail client gets over IMAP and POP3: our Authentication-Results, never a forged one.

Mail with an ``Authentication-Results`` field claiming our authserv-id (in another case, as
RFC 8601 section 5 compares it) goes over real SMTP to runsmtp, is verified here against the
Zone, and is then read with imaplib and poplib: the forged field is gone, ours is first, a
field from another host stays, and every size the servers announce (RFC822.SIZE, LIST, STAT,
the RETR octet count, SEARCH LARGER) is the size of the bytes the client receives.
"""

from __future__ import annotations

import imaplib
import poplib
import re
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest

from mailaccess.server import ServerThread
from mailboxes import authentication, pipeline
from mailboxes.models import Message
from mailboxes.tests import authentication_helpers as helpers
from mailboxes.tests.helpers import message_deliver, messages_wait_stored

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

FORGED = (
    f"Authentication-Results: {helpers.OUR_ID.upper()};\r\n\tspf=pass; dkim=pass header.d=origin.test; dmarc=pass\r\n"
)
OTHER_HOP = "Authentication-Results: mx.forwarder.test; spf=pass smtp.mailfrom=origin.test\r\n"
MULTIPART_BODY = (
    "--b1\r\nContent-Type: text/plain\r\n\r\nThe text part\r\n"
    "--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n"
    "--b1--\r\n"
)


@pytest.fixture
def zone(dns_zone: Any, settings: Any) -> Iterator[Any]:
    yield helpers.zone_prepare(dns_zone, settings)
    authentication.dns_cache_clear()


def _mail(to: str) -> dict[str, bytes]:
    key = helpers.rsa_key()
    signed = helpers.dkim_sign(helpers.message(to=to, subject="Signed and forged"), key)
    return {
        # A forgery above a valid signature (it is not signed), and another hop's verdict.
        "Signed and forged": FORGED.encode() + OTHER_HOP.encode() + signed,
        "Multipart forged": (
            f"From: Origin <news@origin.test>\r\nTo: {to}\r\nSubject: Multipart forged\r\n{FORGED}"
            'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n' + MULTIPART_BODY
        ).encode(),
    }


def _header(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"


def _fields(data: bytes, name: bytes) -> list[bytes]:
    unfolded = re.sub(rb"\r\n[ \t]", b" ", _header(data))
    return [line for line in unfolded.split(b"\r\n") if line.lower().startswith(name.lower() + b":")]


def test_it_presents_our_verdict_and_never_a_forged_one_over_imap_and_pop3(
    world: Any, zone: Any, settings: Any, runsmtp: Any, imap_server: ServerThread, pop3_server: ServerThread
) -> None:
    helpers.publish_key(zone, helpers.rsa_key())
    server = runsmtp(DNS_RESOLVERS=f"127.0.0.1:{zone.port}", SMTP_HOSTNAME=helpers.OUR_ID)
    server.start()
    cases = _mail(world.mailbox.address)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        smtp.ehlo("mail.origin.test")
        for raw in cases.values():
            assert smtp.sendmail("bounce@origin.test", [world.mailbox.address], raw) == {}
    already = Message.objects.count()  # the world's own messages
    arrived = [m for m in messages_wait_stored(already + len(cases)) if m.state == Message.State.STORED]
    assert len(arrived) == len(cases)
    for message in arrived:
        assert pipeline.message_parse(message_id=message.pk, index=True) == "indexed"
    by_subject = {message.subject: message for message in Message.objects.filter(mailbox=world.mailbox)}
    signed, multipart = by_subject["Signed and forged"], by_subject["Multipart forged"]
    assert signed.auth_dkim == "pass" and signed.auth_spf == "pass"
    ours = f"Authentication-Results: {signed.authentication_results}".encode()
    # A message without a verdict (verification off): the forged field left out, nothing first.
    settings.AUTH_VERIFY = False
    legacy_raw = FORGED.encode() + helpers.message(to=world.mailbox.address, subject="Legacy")
    legacy = message_deliver(world.mailbox, legacy_raw)
    assert legacy.authentication is None

    client = imaplib.IMAP4("127.0.0.1", imap_server.port, timeout=10)
    client.login(world.mailbox.address, world.owner_key)
    client.select("INBOX", readonly=True)
    got: dict[str, tuple[int, bytes]] = {}
    for message in (signed, multipart, legacy):
        _status, data = client.uid("FETCH", str(message.uid), "(RFC822.SIZE BODY.PEEK[])")
        size = int(re.search(rb"RFC822\.SIZE (\d+)", data[0][0]).group(1))  # type: ignore[index,union-attr]
        got[message.subject] = (size, data[0][1])  # type: ignore[index]
        assert size == len(data[0][1])  # type: ignore[index]
        # RFC822.SIZE alone (read from the row, no message opened) says the same.
        _status, light = client.uid("FETCH", str(message.uid), "(RFC822.SIZE)")
        assert b"RFC822.SIZE %d" % size in light[0]  # type: ignore[operator]
    for subject in ("Signed and forged", "Multipart forged"):
        size, data = got[subject]
        message = by_subject[subject]
        assert data.startswith(f"Authentication-Results: {helpers.OUR_ID};".encode())
        shown = _fields(data, b"Authentication-Results")
        assert shown[0] == f"Authentication-Results: {message.authentication_results}".encode()
        assert not any(helpers.OUR_ID.upper().encode() in line or b"dmarc=pass header.d" in line for line in shown)
        assert b"dkim=pass header.d=origin.test; dmarc=pass" not in data  # the forgery, anywhere
        field = message.authentication["presented"]["field"].encode()
        assert data.startswith(field) and size == message.size + len(field) - len(FORGED)
    assert got["Signed and forged"][1].count(OTHER_HOP.encode()) == 1  # another host's verdict stays
    assert ours in _fields(got["Signed and forged"][1], b"Authentication-Results")
    unverified = legacy_raw.replace(FORGED.encode(), b"")
    assert got["Legacy"] == (len(unverified), unverified)

    # Sections, partial fetches and the structure are of the same copy.
    size, data = got["Multipart forged"]
    uid = str(multipart.uid)
    _status, parts = client.uid(
        "FETCH", uid, "(BODY.PEEK[HEADER] BODY.PEEK[TEXT] BODY.PEEK[]<0.60> BODY.PEEK[1] BODYSTRUCTURE)"
    )
    pieces = {item[0].split(b" ")[-2]: item[1] for item in parts if isinstance(item, tuple)}
    assert pieces[b"BODY[HEADER]"] == _header(data)
    assert pieces[b"BODY[TEXT]"] == data[len(_header(data)) :] == MULTIPART_BODY.encode()
    assert pieces[b"BODY[]<0>"] == data[:60]
    assert pieces[b"BODY[1]"] == b"The text part"
    _status, fields = client.uid("FETCH", uid, "(BODY.PEEK[HEADER.FIELDS (AUTHENTICATION-RESULTS)])")
    assert fields[0][1].startswith(f"Authentication-Results: {helpers.OUR_ID};".encode())  # type: ignore[index]
    assert helpers.OUR_ID.upper().encode() not in fields[0][1]  # type: ignore[index]
    _status, structure = client.uid("FETCH", uid, "(BODYSTRUCTURE)")
    assert b'"TEXT" "PLAIN"' in structure[0] and b'"MIXED" ("BOUNDARY" "b1")' in structure[0]  # type: ignore[operator]
    _status, found = client.uid("SEARCH", None, "LARGER", str(size - 1))  # type: ignore[arg-type]
    assert uid.encode() in found[0].split()  # type: ignore[union-attr]
    _status, found = client.uid("SEARCH", None, "LARGER", str(size))  # type: ignore[arg-type]
    assert uid.encode() not in found[0].split()  # type: ignore[union-attr]
    client.logout()

    # POP3: the same copy, and LIST, STAT and the octet count agree with what RETR sends.
    pop = poplib.POP3("127.0.0.1", pop3_server.port, timeout=10)
    pop.user(world.mailbox.address)
    pop.pass_(world.owner_key)
    _response, listing, _octets = pop.list()
    sizes = dict(line.split() for line in listing)
    _response, uidls, _octets = pop.uidl()
    numbers = {int(line.split()[1].split(b".")[1]): line.split()[0] for line in uidls}
    world.mailbox.refresh_from_db()
    assert pop.stat()[1] == sum(int(value) for value in sizes.values())
    for message in (signed, multipart, legacy):
        number = numbers[message.uid]
        response, lines, _octets = pop.retr(int(number))
        received = b"\r\n".join(lines) + b"\r\n"
        assert received == got[message.subject][1]
        assert int(sizes[number]) == len(received) == int(response.split()[1])
        assert pop.uidl(int(number)).split()[2] == b"%d.%d" % (world.mailbox.uid_validity, message.uid)
    _response, top, _octets = pop.top(int(numbers[signed.uid]), 0)
    assert top[0].startswith(f"Authentication-Results: {helpers.OUR_ID};".encode())
    assert not any(helpers.OUR_ID.upper().encode() in line for line in top)
    pop.quit()


def test_it_cuts_forged_fields_out_of_any_chunking_and_keeps_the_size_it_announced() -> None:
    raw = (
        b"Authentication-Results: MX.Receiver.Test.; dmarc=pass\r\n"
        b"From: a@origin.test\r\n"
        b"authentication-results: (relayed) mx.receiver.test;\r\n\tdkim=pass\r\n"
        b"Authentication-Results: mx.other.test; spf=pass\r\n"
        b"Received-SPF: pass (mx.receiver.test: domain of a@origin.test) client-ip=192.0.2.1\r\n"
        b"\r\nBody\r\nAuthentication-Results: mx.receiver.test; in the body, left alone\r\n"
    )
    ranges = authentication.forged_ranges(raw, helpers.OUR_ID)
    assert [raw[start:end] for start, end in ranges] == [
        b"Authentication-Results: MX.Receiver.Test.; dmarc=pass\r\n",
        b"authentication-results: (relayed) mx.receiver.test;\r\n\tdkim=pass\r\n",
        b"Received-SPF: pass (mx.receiver.test: domain of a@origin.test) client-ip=192.0.2.1\r\n",
    ]
    presented = {**authentication.presentation_of(raw, f"{helpers.OUR_ID}; spf=none; dkim=none"), "removed": ranges}
    presented["delta"] = len(presented["field"]) - sum(end - start for start, end in ranges)
    whole = authentication.presented_bytes(raw, presented)
    assert whole == (
        f"Authentication-Results: {helpers.OUR_ID};\r\n spf=none;\r\n dkim=none\r\n".encode()
        + b"From: a@origin.test\r\nAuthentication-Results: mx.other.test; spf=pass\r\n"
        + b"\r\nBody\r\nAuthentication-Results: mx.receiver.test; in the body, left alone\r\n"
    )
    assert len(whole) == len(raw) + presented["delta"]
    for size in (1, 2, 5, 13, 64, 4096):
        chunks = [raw[start : start + size] for start in range(0, len(raw), size)]
        assert b"".join(authentication.presented_chunks(chunks, presented)) == whole
    assert authentication.presented_bytes(raw, None) == raw
    # A message that is all header (no empty line): its last field ends the message.
    bare = b"From: a@origin.test\nAuthentication-Results: mx.receiver.test; spf=pass"
    assert authentication.forged_ranges(bare, helpers.OUR_ID) == [[20, len(bare)]]
    assert authentication.own_field("x; y", bare) == "Authentication-Results: x;\n y\n"
