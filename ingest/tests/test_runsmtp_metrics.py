"""runsmtp as a real process: what it counts reaches the web's /metrics (METRICS_DIR), and its
greeting names a host as RFC 5321 wants."""

from __future__ import annotations

import os
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from mailboxes.models import Message

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

RAW = b"From: a@example.org\r\nTo: inbox@acme.example.test\r\nSubject: metrics\r\n\r\nHello.\r\n"


def _samples(name: str) -> list[float]:
    """Every value of one sample name in the web's /metrics (this test process, the same folder)."""
    response = Client(REMOTE_ADDR="127.0.0.1").get("/metrics")
    assert response.status_code == 200
    return [
        sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
        if sample.name == name
    ]


def _wait(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def test_it_shows_runsmtps_spool_and_durable_metrics_at_the_webs_metrics(world: Any, runsmtp: Any) -> None:
    import ingest.metrics  # noqa: F401  (what the web imports: it must not report an empty spool)

    before = sum(_samples("ingest_data_to_durable_seconds_count"))
    server = runsmtp()
    server.start()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("a@example.org", ["inbox@acme.example.test"], RAW)
    _wait(lambda: Message.objects.exists())

    assert sum(_samples("ingest_data_to_durable_seconds_count")) == before + 1
    _wait(lambda: bool(_samples("ingest_spool_free_bytes")))  # the drainer measures between passes
    free = _samples("ingest_spool_free_bytes")
    assert len(free) == 1 and free[0] > 0, free
    assert len(_samples("ingest_spool_depth")) == 1

    server.stop()
    assert sum(_samples("ingest_data_to_durable_seconds_count")) == before + 1  # counts stay


def test_it_names_a_host_not_a_bare_address_in_its_ehlo_reply(world: Any, runsmtp: Any) -> None:
    server = runsmtp(BASE_URL="http://127.0.0.1:8000", MX_HOSTS="", SMTP_HOSTNAME="")
    server.start()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        code, reply = client.ehlo("client.example.org")
    assert code == 250
    assert reply.decode().splitlines()[0] == "[127.0.0.1]"

    named = runsmtp(BASE_URL="http://127.0.0.1:8000", MX_HOSTS="mx.example.com")
    named.start()
    with smtplib.SMTP("127.0.0.1", named.port, timeout=10) as client:
        code, reply = client.ehlo("client.example.org")
    assert reply.decode().splitlines()[0] == "mx.example.com"


def test_it_forgets_the_spool_gauges_of_a_runsmtp_killed_without_a_word(world: Any, runsmtp: Any) -> None:
    from mailplatform.metrics import process_identifier

    server = runsmtp()
    server.start()
    folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    written = folder / f"gauge_livemin_{process_identifier(server.process.pid)}.db"
    _wait(written.exists)  # the drainer's free bytes
    server.kill9()

    _samples("ingest_spool_free_bytes")  # a scrape
    assert not written.exists()  # its last value no longer stands for the spool
