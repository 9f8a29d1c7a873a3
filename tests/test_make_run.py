"""`make run`'s supervisor (scripts/run.py) on embedded defaults, kept running for a while.

The README's first steps must keep working once the beat's periodic jobs have had their go:
here the domain checks run every couple of seconds against a real DNS server that knows
nothing of the demo or temporary-inbox domains (as the internet would answer for them).
"""

from __future__ import annotations

import smtplib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from mailplatform.testing import ChildProcess, free_port, wait_for_port
from tests.test_embedded import embedded_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# A tenant's own domain, checked on every round: it tells the test that the rounds happen.
PROBE = (
    "from tenants.models import Domain, Tenant\n"
    "tenant = Tenant.objects.create(name='Probe', slug='probe')\n"
    "Domain.objects.create(tenant=tenant, name='probe.example.test')\n"
)


def rcpt(port: int, address: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.ehlo()
        smtp.mail("you@example.com")
        return smtp.rcpt(address)


def probe_checks(database: Path) -> set[str]:
    """The check times of the probe domain seen so far (one per check round that reached it)."""
    with sqlite3.connect(database, timeout=10) as db:
        row = db.execute("select last_checked_at from tenants_domain where name = 'probe.example.test'").fetchone()
    return {row[0]} if row and row[0] else set()


def test_it_keeps_the_demo_and_temporary_inbox_domains_receiving_across_domain_checks(
    tmp_path: Path,
    _dns_zone: Any,  # noqa: PT019 (the session's zone, records cleared here)
) -> None:
    _dns_zone.records.clear()  # NXDOMAIN for every name: no TXT record behind the platform's domains
    database = tmp_path / "var" / "mailplatform.sqlite3"
    web_port, smtp_port = free_port(), free_port()
    env = embedded_env(
        tmp_path / "var",
        DNS_RESOLVERS=f"127.0.0.1:{_dns_zone.port}",
        DNS_TIMEOUT="2",
        DOMAIN_CHECK_INTERVAL="1",
        DOMAIN_CHECK_SWEEP="1",
        INGEST_WORKERS="1",
        INGEST_DIRECTORY_REFRESH="1",
        LOG_LEVEL="INFO",
    )
    run = ChildProcess(
        [
            sys.executable, "scripts/run.py", "--port", str(web_port), "--smtp-port", str(smtp_port),
            "--imap-port", str(free_port()), "--pop3-port", str(free_port()),
        ],
        env=env,
        cwd=ROOT,
    )  # fmt: skip
    try:
        run.wait_for_line("mailplatform is running", timeout=180)
        wait_for_port("127.0.0.1", web_port, timeout=60)
        wait_for_port("127.0.0.1", smtp_port, timeout=60)
        mailbox = next(line.split()[1] for line in run.lines if line.strip().startswith("mailbox "))
        run.wait_for_line("sign in as", timeout=5)  # the demo user, for a new link once the printed one is used
        signer = next(line.split()[3] for line in run.lines if line.strip().startswith("sign in as "))
        assert signer == env.get("DEMO_USER_EMAIL", "demo@mailplatform.localhost"), signer
        created = requests.post(f"http://127.0.0.1:{web_port}/api/v1/temp-inboxes/", timeout=30)
        assert created.status_code == 201, created.text
        temporary = created.json()["address"]
        probe = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert probe.returncode == 0, probe.stderr[-3000:]

        seen: set[str] = set()
        deadline = time.monotonic() + 120
        while len(seen) < 4:  # four check rounds, all after both platform domains existed
            assert time.monotonic() < deadline, run.output[-4000:]
            assert run.process.poll() is None, run.output[-4000:]
            seen |= probe_checks(database)
            time.sleep(0.3)
        time.sleep(2.5)  # the recipient directory has seen whatever the checks wrote

        for address in (mailbox, temporary):
            code, text = rcpt(smtp_port, address)
            assert code == 250, (address, code, text, run.output[-3000:])
    finally:
        run.process.send_signal(2)  # Ctrl-C: the supervisor stops its children in order
        try:
            run.process.wait(30)
        finally:
            run.stop()
