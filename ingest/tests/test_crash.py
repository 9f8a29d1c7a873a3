"""runsmtp as a real process: kill -9 right after the 250s, restart, nothing lost or doubled."""

from __future__ import annotations

import smtplib
import time
from typing import Any

import pytest

from audit.models import Event
from mailboxes.models import Message

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

BODY = b"Subject: crash\r\n\r\nbody\r\n"


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


def test_it_stores_every_acknowledged_message_exactly_once_across_kill_9(world: Any, runsmtp: Any) -> None:
    server = runsmtp()
    server.start()
    queue_ids = []
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        smtp.ehlo()
        for n in range(6):
            smtp.mail("a@example.org")
            smtp.rcpt(f"inbox+{n}@acme.example.test")
            smtp.rcpt("theirs@outsider.example.test")
            code, text = smtp.data(BODY)
            assert code == 250
            queue_ids.append(text.decode().rsplit(" ", 1)[1])
        server.kill9()  # the drainer may be anywhere: before, inside or after its transaction
    restarted = runsmtp()
    restarted.start()
    wait_for(lambda: not list(restarted.spool_dir.joinpath("new").iterdir()))
    wait_for(lambda: Message.objects.count() >= 12)
    time.sleep(1.0)  # a duplicate would show up now
    restarted.stop()
    assert sorted(Message.objects.filter(mailbox=world.mailbox).values_list("trace_id", flat=True)) == sorted(queue_ids)
    assert Message.objects.filter(mailbox=world.outsider_mailbox).count() == 6
    assert Event.objects.filter(type="ingest.received").count() == 12
    assert list(restarted.spool_dir.joinpath("tmp").iterdir()) == []


def test_it_keeps_accepting_while_the_database_is_down_and_drain_spool_recovers(world: Any, runsmtp: Any) -> None:
    from django.core.management import call_command

    server = runsmtp()
    server.start("--no-drain")
    time.sleep(1.5)  # the directory has loaded
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        assert smtp.sendmail("a@example.org", ["inbox@acme.example.test"], BODY) == {}
    server.kill9()
    down = runsmtp(DATABASE_URL="postgres://postgres@127.0.0.1:1/nowhere")
    down.start("--no-drain")
    with smtplib.SMTP("127.0.0.1", down.port, timeout=10) as smtp:
        smtp.ehlo()
        smtp.mail("a@example.org")
        code, text = smtp.rcpt("inbox@acme.example.test")
    assert (code, text[:5]) == (451, b"4.3.0")  # never a wrong reject
    down.stop()
    assert Message.objects.count() == 0
    from django.test import override_settings

    with override_settings(SPOOL_DIR=server.spool_dir):
        call_command("drain_spool")
    assert Message.objects.get().mailbox == world.mailbox
