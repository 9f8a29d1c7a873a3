"""Antivirus before the 250: the clamd client and reject mode, against a real clamd.

The session's clamd (``clamd_server``: Debian's daemon, StreamMaxLength 256K, an EICAR
signature database written by the harness) answers over TCP and its unix socket; SMTP and
LMTP are spoken over real sockets to the in-process server.
"""

from __future__ import annotations

import asyncio
import smtplib
from typing import Any

import pytest

from ingest.tests.antivirus_messages import INFECTED, clean_message, oversized
from mailplatform import clamd
from mailplatform.testing import free_port
from mailplatform.testing_clamd import FOUND
from tenants.models import AntivirusMode

pytestmark = pytest.mark.django_db


# --- the client -------------------------------------------------------------------------
@pytest.mark.parametrize("build", INFECTED.values(), ids=INFECTED.keys())
def test_it_finds_eicar_as_attachment_nested_base64_and_zipped(clamd_server: Any, build: Any) -> None:
    result = clamd.scan(build(), url=clamd_server.tcp_url)
    assert (result.verdict, result.signature) == ("infected", FOUND)


def test_it_answers_clean_over_the_unix_socket_from_the_event_loop(clamd_server: Any) -> None:
    result = asyncio.run(clamd.scan_async(clean_message(), url=clamd_server.unix_url))
    assert (result.verdict, result.signature, result.error) == ("clean", "", "")
    infected = asyncio.run(clamd.scan_async(INFECTED["zipped"](), url=clamd_server.unix_url))
    assert infected.signature == FOUND


def test_it_reads_clamds_stream_limit_as_too_large_never_clean(clamd_server: Any) -> None:
    big = oversized(300 * 1024)  # over clamd's StreamMaxLength (256K); ours is larger
    for result in (
        clamd.scan(big, url=clamd_server.tcp_url, max_length=10 * 1024 * 1024),
        asyncio.run(clamd.scan_async(big, url=clamd_server.tcp_url, max_length=10 * 1024 * 1024)),
    ):
        assert result.verdict == "too_large" and not result.infected
    # Our own limit (CLAMD_STREAM_MAX_LENGTH) stops it before it is sent.
    assert clamd.scan(clean_message(), url="tcp://127.0.0.1:1", max_length=10).verdict == "too_large"


def test_it_answers_error_when_clamd_cannot_be_reached() -> None:
    dead = f"tcp://127.0.0.1:{free_port()}"
    assert clamd.scan(clean_message(), url=dead, timeout=2).verdict == "error"
    assert asyncio.run(clamd.scan_async(clean_message(), url=dead, timeout=2)).verdict == "error"
    assert clamd.scan(clean_message(), url="unix:///nonexistent/clamd.sock").verdict == "error"


@pytest.mark.parametrize("url", ["http://clamd:3310", "tcp://clamd", "unix://relative.sock", "clamd"])
def test_it_refuses_a_clamd_url_it_cannot_use(url: str) -> None:
    with pytest.raises(clamd.ClamdUrlInvalid):
        clamd.address_parse(url)


# --- reject mode over SMTP and LMTP ---------------------------------------------------------
def _reject_mode(world: Any, settings: Any, url: str, *, fail_open: bool = False) -> None:
    settings.CLAMD_URL = url
    settings.ANTIVIRUS_FAIL_OPEN = fail_open
    world.domain.antivirus_mode = AntivirusMode.REJECT
    world.domain.save(update_fields=["antivirus_mode", "updated_at"])


def _send(server: Any, content: bytes, rcpt: str = "inbox@acme.example.test") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        smtp.ehlo("client.example.org")
        smtp.mail("mallory@sender.example")
        smtp.rcpt(rcpt)
        return smtp.data(content)


@pytest.mark.parametrize("build", INFECTED.values(), ids=INFECTED.keys())
def test_it_refuses_infected_mail_with_554_and_stores_nothing(
    world: Any, settings: Any, clamd_server: Any, smtp_server: Any, build: Any
) -> None:
    _reject_mode(world, settings, clamd_server.tcp_url)
    server = smtp_server()
    code, text = _send(server, build())
    assert code == 554
    assert text.startswith(b"5.7.1 Message refused: virus found (Mailplatform.Test.EICAR")
    assert server.spool.pending() == [] and list(server.spool.tmp.iterdir()) == []


def test_it_accepts_clean_mail_with_its_verdict_in_the_spool(
    world: Any, settings: Any, clamd_server: Any, smtp_server: Any
) -> None:
    _reject_mode(world, settings, clamd_server.unix_url)
    server = smtp_server()
    code, _ = _send(server, clean_message())
    assert code == 250
    envelope, _ = server.spool.read(server.spool.pending()[0])
    assert envelope.antivirus is not None and envelope.antivirus["verdict"] == "clean"


def test_it_does_not_scan_before_the_250_outside_reject_mode(
    world: Any, settings: Any, clamd_server: Any, smtp_server: Any
) -> None:
    settings.CLAMD_URL = clamd_server.tcp_url
    world.domain.antivirus_mode = AntivirusMode.QUARANTINE
    world.domain.save(update_fields=["antivirus_mode", "updated_at"])
    server = smtp_server()
    assert _send(server, INFECTED["zipped"]())[0] == 250  # scanned after the 250, in the pipeline
    envelope, _ = server.spool.read(server.spool.pending()[0])
    assert envelope.antivirus is None


def test_it_refuses_mail_too_large_to_scan_with_552(
    world: Any, settings: Any, clamd_server: Any, smtp_server: Any
) -> None:
    _reject_mode(world, settings, clamd_server.tcp_url)
    server = smtp_server()
    code, text = _send(server, oversized(300 * 1024))
    assert (code, text) == (552, b"5.3.4 Message too large to be scanned for viruses")
    assert server.spool.pending() == []


def test_it_fails_closed_with_451_when_clamd_stops_and_accepts_again_once_it_is_back(
    world: Any, settings: Any, clamd_server: Any, smtp_server: Any
) -> None:
    _reject_mode(world, settings, clamd_server.tcp_url)
    server = smtp_server()
    clamd_server.stop()
    try:
        code, text = _send(server, clean_message())
        assert (code, text) == (451, b"4.3.0 Virus scanner unavailable, try again later")
        assert server.spool.pending() == []
    finally:
        clamd_server.start()
    assert _send(server, clean_message())[0] == 250


def test_it_fails_open_accepting_with_the_verdict_error_for_a_rescan(
    world: Any, settings: Any, smtp_server: Any
) -> None:
    _reject_mode(world, settings, f"tcp://127.0.0.1:{free_port()}", fail_open=True)
    server = smtp_server()
    assert _send(server, INFECTED["plain_attachment"]())[0] == 250
    envelope, _ = server.spool.read(server.spool.pending()[0])
    assert envelope.antivirus is not None and envelope.antivirus["verdict"] == "error"


def test_it_refuses_only_the_reject_mode_recipients_over_lmtp(
    world: Any, settings: Any, clamd_server: Any, smtp_server: Any
) -> None:
    _reject_mode(world, settings, clamd_server.tcp_url)
    world.outsider_domain.antivirus_mode = AntivirusMode.TAG
    world.outsider_domain.save(update_fields=["antivirus_mode", "updated_at"])
    server = smtp_server(lmtp=True)
    with smtplib.LMTP("127.0.0.1", server.port, timeout=30) as lmtp:
        lmtp.ehlo("client.example.org")
        lmtp.mail("mallory@sender.example")
        lmtp.rcpt("inbox@acme.example.test")
        lmtp.rcpt("theirs@outsider.example.test")
        lmtp.putcmd("data")
        assert lmtp.getreply()[0] == 354
        lmtp.send(INFECTED["nested_base64"]() + b".\r\n")
        replies = [lmtp.getreply(), lmtp.getreply()]
    assert [code for code, _ in replies] == [554, 250]
    envelope, _ = server.spool.read(server.spool.pending()[0])
    assert [r.address for r in envelope.recipients] == ["theirs@outsider.example.test"]
    assert envelope.antivirus is not None
    assert (envelope.antivirus["verdict"], envelope.antivirus["signature"]) == ("infected", FOUND)


@pytest.mark.parametrize(
    ("name", "value"), [("CLAMD_URL", "http://127.0.0.1:3310"), ("ANTIVIRUS_MODE", "maybe")], ids=["url", "mode"]
)
def test_it_stops_at_start_on_a_bad_antivirus_setting(name: str, value: str) -> None:
    import subprocess
    import sys
    from pathlib import Path

    from mailplatform.testing import env_with

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=root,
        env=env_with(**{name: value}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and f"configuration error: {name}:" in done.stderr, done.stderr[-500:]
