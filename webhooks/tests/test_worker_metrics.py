"""A real Celery worker's counters reach the web's /metrics (multiprocess mode, METRICS_DIR)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from ingest.services import accept, spool_entries_drain
from ingest.spool import Recipient, Spool
from mailboxes.models import Message
from webhooks.models import Delivery
from webhooks.tests.conftest import make_endpoint

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

RAW = b"From: a@example.org\r\nTo: inbox@acme.example.test\r\nSubject: metrics\r\n\r\nHello.\r\n"


def _sample(name: str, **labels: str) -> float:
    """The value of one sample as the web's /metrics serves it (0 when absent)."""
    response = Client(REMOTE_ADDR="127.0.0.1").get("/metrics")
    assert response.status_code == 200
    total = 0.0
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _wait(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def test_it_shows_the_workers_webhook_and_parse_counters_at_metrics(
    world: Any, receiver: Any, celery_worker: Any, tmp_path: Any
) -> None:
    delivered = _sample("mailplatform_webhook_deliveries_total", outcome="delivered")
    attempts = _sample("mailplatform_webhook_attempt_seconds_count")
    parsed = _sample("mailboxes_parsed_total", outcome="parsed")
    make_endpoint(world, receiver.url(), event_types=["indexer.indexed"])
    spool = Spool(tmp_path / "spool")
    recipient = Recipient(
        address="inbox@acme.example.test", mailbox_id=str(world.mailbox.pk), tenant_id=str(world.tenant.pk)
    )
    queue_id = accept(content=RAW, mail_from="a@example.org", recipients=[recipient], spool=spool)

    assert spool_entries_drain(spool, [queue_id]) == ["stored"]  # parse enqueued for the worker

    _wait(lambda: Message.objects.filter(trace_id=queue_id, state=Message.State.INDEXED).exists())
    _wait(lambda: Delivery.objects.filter(state=Delivery.State.DELIVERED).exists())
    _wait(lambda: _sample("mailplatform_webhook_deliveries_total", outcome="delivered") > delivered, timeout=10)
    assert _sample("mailplatform_webhook_attempt_seconds_count") > attempts
    assert _sample("mailboxes_parsed_total", outcome="parsed") > parsed


def test_it_still_serves_the_scrape_time_gauges_next_to_the_files(db: Any) -> None:
    content = Client(REMOTE_ADDR="127.0.0.1").get("/metrics").content
    assert b"\nmailplatform_webhook_pending " in content  # computed from the database when scraped
    assert b"python_info" in content
