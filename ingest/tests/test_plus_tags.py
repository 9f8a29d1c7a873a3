"""Plus-addressing: every RCPT to one mailbox tags its one Message (DESIGN section 3 step 1)."""

from __future__ import annotations

import smtplib
from typing import Any

import pytest

from ingest.services import spool_drain
from mailboxes.models import Message

pytestmark = pytest.mark.django_db

BODY = b"From: a@example.org\r\nSubject: hello\r\n\r\nHello.\r\n"


def _send(server: Any, recipients: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        smtp.ehlo("client.example.org")
        refused = smtp.sendmail("sender@example.org", recipients, BODY)
    assert refused == {}


def test_it_merges_the_tags_of_every_rcpt_to_one_mailbox(world: Any, smtp_server: Any) -> None:
    server = smtp_server()
    _send(server, ["inbox@acme.example.test", "inbox+news@acme.example.test", "Inbox+weekly+news@acme.example.test"])

    assert spool_drain(server.spool) == {"stored": 1}
    message = Message.objects.get()
    assert message.mailbox == world.mailbox
    assert message.tags == ["news", "weekly"]
    assert message.rcpt == "inbox@acme.example.test"  # the first RCPT names the message


def test_it_keeps_the_tags_of_each_mailbox_to_itself(world: Any, smtp_server: Any) -> None:
    server = smtp_server()
    _send(server, ["inbox+a@acme.example.test", "sibling+b@acme.example.test", "inbox+c@acme.example.test"])

    assert spool_drain(server.spool) == {"stored": 1}
    tags = dict(Message.objects.values_list("mailbox__local_part", "tags"))
    assert tags == {"inbox": ["a", "c"], "sibling": ["b"]}
