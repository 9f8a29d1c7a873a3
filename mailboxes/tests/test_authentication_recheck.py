"""Verdicts with a temperror verified again by the sweeper, against the real DNS server.

The Zone first answers SERVFAIL (its resolve replaced for a while), then serves the records:
the same resolver address, an outage and its end, as a sender's DNS would have one.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from mailboxes import authentication
from mailboxes.models import Message
from mailboxes.tests import authentication_helpers as helpers
from mailboxes.tests.factories import MailboxFactory

OUR_ID = helpers.OUR_ID


@pytest.fixture
def zone(dns_zone: Any, settings: Any) -> Iterator[Any]:
    yield helpers.zone_prepare(dns_zone, settings)
    authentication.dns_cache_clear()


@pytest.fixture
def mailbox(db: Any) -> Any:
    return MailboxFactory(local_part="inbox")


def _servfail(zone: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from dnslib import RCODE

    def resolve(request: Any, handler: Any) -> Any:
        reply = request.reply()
        reply.header.rcode = RCODE.SERVFAIL
        return reply

    monkeypatch.setattr(zone, "resolve", resolve)


def _time_passes(message: Message) -> None:
    """The re-check is due now, and the 5 s memory of failed look-ups is over."""
    Message.objects.filter(pk=message.pk).update(auth_recheck_at=timezone.now() - timedelta(seconds=1))
    authentication.dns_cache_clear()


def test_it_verifies_a_temperror_verdict_again_once_the_dns_answers(
    zone: Any, mailbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = helpers.rsa_key()
    helpers.publish_key(zone, key)
    forged = f"Authentication-Results: {OUR_ID}; dmarc=pass header.from=origin.test\r\n"
    raw = helpers.dkim_sign(helpers.message(extra=forged), key)
    with monkeypatch.context() as outage:
        _servfail(zone, outage)
        message = helpers.deliver(mailbox, raw)
    assert (message.auth_spf, message.auth_dkim, message.auth_dmarc) == ("temperror", "temperror", "temperror")
    served = message.authentication["presented"]  # what IMAP and POP3 serve from now on
    assert "spf=temperror" in served["field"]
    due_in = (message.auth_recheck_at - timezone.now()).total_seconds()
    assert authentication.RECHECK_DELAYS[0] - 5 < due_in <= authentication.RECHECK_DELAYS[0]
    assert authentication.messages_reverify_due() == 0  # not due yet

    _time_passes(message)
    assert authentication.messages_reverify_due() == 1
    message.refresh_from_db()

    assert (message.auth_spf, message.auth_dkim, message.auth_dmarc) == ("pass", "pass", "pass")
    assert message.auth_recheck_at is None
    assert message.authentication["rechecks"] == 1
    assert message.authentication_results.startswith(f"{OUR_ID}; spf=pass smtp.mailfrom=origin.test; dkim=pass")
    # Our new header first, the temperror one and the forgery gone.
    ours = [value for name, value in message.headers if name.lower() == "authentication-results"]
    assert ours == [message.authentication_results]
    assert Message.objects.filter(pk=message.pk, auth_dmarc="pass").exists()
    # The copy IMAP and POP3 serve does not change under its UID (RFC 3501 section 2.3.1.1).
    assert message.authentication["presented"] == served


def test_it_gives_up_after_the_last_recheck_and_keeps_the_last_verdict(
    zone: Any, mailbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _servfail(zone, monkeypatch)
    message = helpers.deliver(mailbox, helpers.message())
    assert message.auth_spf == "temperror"

    delays = []
    for _ in authentication.RECHECK_DELAYS:
        _time_passes(message)
        before = timezone.now()
        assert authentication.messages_reverify_due() == 1
        message.refresh_from_db()
        assert message.auth_spf == "temperror"
        if message.auth_recheck_at is not None:
            delays.append((message.auth_recheck_at - before).total_seconds())

    # Backoff: each wait longer than the one before, then no more re-checks.
    assert [round(delay, -1) for delay in delays] == [round(d, -1) for d in authentication.RECHECK_DELAYS[1:]]
    assert message.auth_recheck_at is None
    assert message.authentication["rechecks"] == len(authentication.RECHECK_DELAYS)
    assert message.authentication_results.startswith(f"{OUR_ID}; spf=temperror")
    assert authentication.messages_reverify_due() == 0


def test_it_schedules_no_recheck_for_a_verdict_without_temperror(zone: Any, mailbox: Any) -> None:
    message = helpers.deliver(mailbox, helpers.message())

    assert message.auth_spf == "pass"
    assert message.auth_recheck_at is None


def test_it_registers_the_sweeper_with_beat() -> None:
    import mailboxes.tasks  # noqa: F401  (registers the task, as the worker's autodiscovery does)
    from mailplatform.celery import app

    entry = app.conf.beat_schedule["messages-reverify-sweep"]
    assert entry["task"] == "mailboxes.tasks.messages_reverify_sweep"
    assert entry["task"] in app.tasks
