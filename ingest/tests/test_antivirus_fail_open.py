"""End to end, fail open: reject mode with clamd down accepts, and the sweeper scans later.

runsmtp (a process, with its drainer) runs with ``ANTIVIRUS_FAIL_OPEN=true`` against the
session's real clamd, which is stopped before the mail is sent: the 250 comes with the
verdict ``error`` instead of ``451``. The parse here (clamd still down) lets the mail on,
tagged ``unscanned``; once clamd is back the rescan sweep (the Celery task itself) finds it
clean, or infected and then quarantined as reject mode wants.
"""

from __future__ import annotations

import smtplib
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from audit.models import Event
from ingest.tests.antivirus_messages import INFECTED, clean_message
from mailboxes import antivirus, pipeline
from mailboxes.models import Message
from mailboxes.tasks import messages_rescan_sweep
from mailboxes.tests.helpers import messages_wait_stored
from mailplatform.testing_clamd import FOUND
from tenants.models import AntivirusMode, Domain

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_accepts_with_clamd_down_in_reject_mode_and_the_sweep_scans_it_once_clamd_is_back(
    world: Any, settings: Any, clamd_server: Any, runsmtp: Any, pipeline_queues_empty: None
) -> None:
    Domain.objects.filter(pk=world.domain.pk).update(antivirus_mode=AntivirusMode.REJECT)
    antivirus._modes.clear()
    settings.CLAMD_URL = clamd_server.tcp_url
    settings.ANTIVIRUS_FAIL_OPEN = True
    server = runsmtp(CLAMD_URL=clamd_server.tcp_url, ANTIVIRUS_FAIL_OPEN="true")
    server.start()
    clamd_server.stop()
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
            for subject, raw in (("clean", clean_message()), ("eicar", INFECTED["nested_base64"]())):
                smtp.ehlo("client.example.org")
                smtp.mail(f"{subject}@sender.example")
                smtp.rcpt(world.mailbox.address)
                assert smtp.data(raw)[0] == 250, subject  # not 451: fail open
        stored = messages_wait_stored(2, timeout=20)
        assert [message.antivirus_verdict for message in stored] == ["error", "error"]  # scanned before the 250
        for message in stored:
            assert pipeline.message_parse(message_id=message.pk, index=True) == "indexed"  # still down: goes on
        assert sorted(Message.objects.values_list("antivirus_verdict", "tags")) == [
            ("error", ["unscanned"]),
            ("error", ["unscanned"]),
        ]
    finally:
        clamd_server.start()
    # The sweep takes scans that failed at least a minute ago: as if that minute had passed.
    Message.objects.update(antivirus_scanned_at=timezone.now() - timedelta(minutes=2))
    messages_rescan_sweep()

    clean = Message.objects.get(mail_from="clean@sender.example")
    assert (clean.state, clean.antivirus_verdict, clean.antivirus_signature, clean.tags) == (
        "indexed",
        "clean",
        "",
        [],
    )
    infected = Message.objects.get(mail_from="eicar@sender.example")
    assert (infected.state, infected.state_reason) == ("quarantined", "virus")
    assert (infected.antivirus_verdict, infected.antivirus_signature) == ("infected", FOUND)
    [event] = Event.objects.filter(message_id=infected.pk, type="message.quarantined")
    assert (event.data["reason"], event.data["signature"]) == ("virus", FOUND)
    assert Message.objects.filter(antivirus_verdict="error").count() == 0  # nothing left for the next sweep
