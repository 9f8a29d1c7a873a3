"""SMTP submission through a real ``runsmtp --submission`` process and smtplib: STARTTLS
required, AUTH with an API key, the same sender rules and queue as the API."""

from __future__ import annotations

import smtplib
import ssl
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mailplatform.testing import ROOT, ChildProcess, free_port, wait_for_port
from outbound.models import OutboundMessage, Recipient

MESSAGE = (
    b"From: Inbox <inbox@acme.example.test>\r\nTo: gina@remote.example.org\r\nBcc: quiet@remote.example.org\r\n"
    b"Subject: submitted\r\n\r\nHello over submission.\r\n"
)


@pytest.fixture
def submission_process(live_env: dict[str, str]) -> Iterator[tuple[int, ChildProcess]]:
    port = free_port()
    child = ChildProcess(
        [sys.executable, "manage.py", "runsmtp", "--submission", "--port", str(port)],
        env={**live_env, "LOG_LEVEL": "INFO"},  # what make run shows
        cwd=ROOT,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        yield port, child
    finally:
        child.stop()


@pytest.fixture
def submission(submission_process: tuple[int, ChildProcess]) -> int:
    return submission_process[0]


def _tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the development self-signed certificate
    return context


def test_it_requires_starttls_and_a_valid_key_then_queues_like_the_api(world: Any, submission: int) -> None:
    with smtplib.SMTP("127.0.0.1", submission, timeout=10) as plain:
        plain.ehlo()
        assert plain.has_extn("starttls") and not plain.has_extn("auth")  # no AUTH offered in the clear
        code, text = plain.mail("inbox@acme.example.test")
        assert code == 530 and b"STARTTLS" in text
    with smtplib.SMTP("127.0.0.1", submission, timeout=10) as client:
        client.starttls(context=_tls())
        client.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login("anyone", "mp_not_a_key")
        assert refused.value.smtp_code == 535
        code, _ = client.mail("inbox@acme.example.test")
        assert code == 530  # still not authenticated
    reader = world.key(["messages:read"], name="reader")
    with smtplib.SMTP("127.0.0.1", submission, timeout=10) as client:
        client.starttls(context=_tls())
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("reader", reader)  # a key without messages:send
    sender = world.key(["messages:send"], name="sender")
    with smtplib.SMTP("127.0.0.1", submission, timeout=10) as client:
        client.starttls(context=_tls())
        client.login("inbox@acme.example.test", sender)
        with pytest.raises(smtplib.SMTPDataError) as foreign:
            client.sendmail("x@acme.example.test", ["gina@remote.example.org"], MESSAGE.replace(b"inbox@", b"nobody@"))
        assert foreign.value.smtp_code == 550
        refused_rcpts = client.sendmail(
            "inbox@acme.example.test", ["gina@remote.example.org", "quiet@remote.example.org"], MESSAGE
        )
        assert refused_rcpts == {}
    message = OutboundMessage.objects.get()
    assert message.source == "submission" and message.from_address == "inbox@acme.example.test"
    assert b"Bcc:" not in bytes(message.content) and b"Message-ID:" in bytes(message.content)
    assert sorted(Recipient.objects.values_list("address", "state")) == [
        ("gina@remote.example.org", "queued"),
        ("quiet@remote.example.org", "queued"),
    ]


def test_it_logs_a_refused_certificate_in_one_line_and_no_command_or_auth_noise(
    world: Any, submission_process: tuple[int, ChildProcess]
) -> None:
    port, child = submission_process
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client, pytest.raises(ssl.SSLError):
        client.starttls(context=ssl.create_default_context())  # refuses our self-signed certificate
    sender = world.key(["messages:send"], name="sender")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=_tls())
        client.login("inbox@acme.example.test", sender)
        client.noop()
    deadline = time.monotonic() + 5
    while "TLS handshake failed" not in child.output and time.monotonic() < deadline:
        time.sleep(0.05)
    output = child.output
    assert "TLS handshake failed" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "login_data is deprecated" not in output, output[-3000:]
    assert ">> b'ehlo" not in output.lower(), output[-3000:]  # aiosmtpd's per-command INFO lines
