"""BODYSTRUCTURE, ENVELOPE and every BODY[section] answer what Dovecot answers for the same bytes.

Every .eml fixture of the parser's tests (nested and broken multiparts, message/rfc822,
8-bit headers, RFC 2231 parameters) goes into our mailbox and into a Dovecot maildir; the
parsed FETCH responses must be equal, ignoring only the letter case of the MIME names
(Dovecot lowercases them, we keep RFC 3501's examples' uppercase).
"""

from __future__ import annotations

import imaplib
import shutil
from typing import Any

import pytest
from imapclient.response_parser import parse_fetch_response

from mailaccess.server import ServerThread
from mailaccess.tests import dovecot
from mailboxes.tests.helpers import FIXTURES, message_deliver

pytestmark = pytest.mark.django_db(transaction=True)


def _crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _lower(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.lower()
    if isinstance(value, (tuple, list)):
        return tuple(_lower(item) for item in value)
    return value


def _sections(structure: Any, prefix: str = "") -> list[str]:
    """Every part number of a parsed BODYSTRUCTURE ("1", "1.2", ...)."""
    found: list[str] = []
    if structure.is_multipart:
        for index, part in enumerate(structure[0], 1):
            number = f"{prefix}{index}"
            found.append(number)
            found.append(f"{number}.MIME")
            found += _sections(part, f"{number}.") if part.is_multipart else []
    else:
        found.append(f"{prefix}1" if not prefix else prefix.rstrip("."))
    return found


def _fetch(client: imaplib.IMAP4, number: int, items: str) -> dict[bytes, Any]:
    status, data = client.fetch(str(number), items)
    assert status == "OK", (number, items, data)
    return dict(parse_fetch_response(data)[number])  # type: ignore[arg-type]


def test_it_answers_like_dovecot_for_every_fixture(imap_server: ServerThread, world: Any) -> None:
    dovecot.require()
    tmp_path = dovecot.workdir()
    messages = []
    for path in sorted(FIXTURES.glob("*.eml")):
        raw = _crlf(path.read_bytes())
        # A quarantined message (deep_nesting.eml) is not shown to mail clients.
        if message_deliver(world.mailbox, raw).state != "quarantined":
            messages.append(raw)
    assert len(messages) > 15
    dovecot.maildir_write(tmp_path, messages)
    dovecot.config_write(tmp_path)
    reference = imaplib.IMAP4_stream(dovecot.imap_stream_command(tmp_path))
    reference.select("INBOX", readonly=True)
    ours = imaplib.IMAP4("127.0.0.1", imap_server.port, timeout=10)
    ours.login(world.mailbox.address, world.owner_key)
    ours.select("INBOX", readonly=True)
    differences = []
    for number in range(1, len(messages) + 1):
        items = "(RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY)"
        theirs, mine = _fetch(reference, number, items), _fetch(ours, number, items)
        for name in (b"RFC822.SIZE", b"ENVELOPE", b"BODYSTRUCTURE", b"BODY"):
            if _lower(theirs[name]) != _lower(mine[name]):
                differences.append((number, name, theirs[name], mine[name]))
        sections = ["HEADER", "TEXT", "HEADER.FIELDS (FROM SUBJECT)", *_sections(theirs[b"BODYSTRUCTURE"])]
        for section in sections:
            wanted = f"BODY.PEEK[{section}]"
            key = f"BODY[{section}]".encode()
            theirs_part = _fetch(reference, number, f"({wanted})")
            mine_part = _fetch(ours, number, f"({wanted})")
            if theirs_part.get(key) != mine_part.get(key):
                differences.append((number, key, theirs_part.get(key), mine_part.get(key)))
    reference.logout()
    ours.logout()
    shutil.rmtree(tmp_path, ignore_errors=True)
    for difference in differences:
        print("DIFF", difference)
    assert differences == []
