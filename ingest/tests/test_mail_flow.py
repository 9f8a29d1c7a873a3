"""Whether mail flows: heartbeats of runsmtp and workers, spool and parse backlog, in /readyz and /metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from ingest.heartbeats import heartbeat_record
from ingest.models import Heartbeat
from mailboxes.tests.helpers import message_store

RAW = b"From: a@example.org\r\nSubject: waiting\r\n\r\nHello.\r\n"


def _ready(remote: str = "127.0.0.1") -> tuple[int, dict[str, Any]]:
    response = Client(REMOTE_ADDR=remote).get("/readyz")
    return response.status_code, response.json()


def _codes(body: dict[str, Any]) -> set[str]:
    return {warning["code"] for warning in body["warnings"]}


def _wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; /readyz says {_ready()[1]}")
        time.sleep(0.25)


def _beat(kind: str, node: str, **details: Any) -> None:
    heartbeat_record(kind=kind, node=node, pid=1, started_at=timezone.now(), details=details)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_it_shows_runsmtp_and_a_worker_and_reports_them_once_they_stop(
    world: Any, live_env: dict[str, str], runsmtp: Any, settings: Any
) -> None:
    from mailplatform.testing import ALL_QUEUES, start_celery_worker

    settings.HEARTBEAT_STALE_AFTER = 3
    smtp = runsmtp(HEARTBEAT_INTERVAL="1")
    smtp.start()
    worker = start_celery_worker(queue=ALL_QUEUES, name="flow", env={**live_env, "HEARTBEAT_INTERVAL": "1"})
    try:

        def both_live() -> bool:
            nodes = _ready()[1].get("nodes", [])
            return {(node["kind"], node["stale"]) for node in nodes} >= {("smtp", False), ("worker", False)}

        _wait_for(both_live)
        status, body = _ready()
        assert status == 200
        assert body["mail_flow"] == "ok", body["warnings"]
        (smtp_node,) = [node for node in body["nodes"] if node["kind"] == "smtp"]
        assert smtp_node["node"].endswith(f":{smtp.port}")
        assert smtp_node["spool_depth"] == 0
        (worker_node,) = [node for node in body["nodes"] if node["kind"] == "worker"]
        assert worker_node["node"].startswith("flow@")
    finally:
        smtp.stop()
        worker.stop()

    _wait_for(lambda: {"smtp_stale", "worker_stale"} <= _codes(_ready()[1]), timeout=20)
    status, body = _ready()
    assert status == 200  # the web node itself is still ready
    assert body["mail_flow"] == "degraded"
    assert {"no_live_smtp_node", "no_live_worker"} <= _codes(body)
    assert {node["kind"]: node["stale"] for node in body["nodes"]} == {"smtp": True, "worker": True}


@pytest.mark.django_db
def test_it_warns_of_an_old_spool_entry_a_full_spool_and_an_old_unparsed_message(world: Any, settings: Any) -> None:
    settings.MAIL_FLOW_SPOOL_MAX_AGE = 60
    settings.MAIL_FLOW_UNPARSED_MAX_AGE = 60
    _beat("worker", "w@host")
    _beat(
        "smtp", "mx1:25", spool_depth=3, spool_oldest_age_seconds=5.0, spool_free_bytes=10**9, spool_low_water_bytes=1
    )
    assert _ready()[1]["mail_flow"] == "ok"

    _beat("smtp", "mx1:25", spool_depth=3, spool_oldest_age_seconds=900.0, spool_free_bytes=1, spool_low_water_bytes=2)
    message_store(world.mailbox, RAW, received_at=timezone.now() - timedelta(minutes=10))

    status, body = _ready()
    assert status == 200
    assert body["mail_flow"] == "degraded"
    assert _codes(body) == {"spool_backlog", "spool_low_space", "unparsed_backlog"}
    assert body["backlog"]["spool_oldest_age_seconds"] >= 900
    assert body["backlog"]["unparsed_oldest_age_seconds"] >= 600


@pytest.mark.django_db
def test_it_names_no_node_to_a_client_that_may_not_read_metrics(world: Any) -> None:
    _beat("smtp", "mx-secret-name:25")
    Heartbeat.objects.update(last_seen=timezone.now() - timedelta(hours=1))
    status, body = _ready(remote="203.0.113.9")
    assert status == 200
    assert "nodes" not in body
    assert "smtp_stale" in _codes(body)
    assert "mx-secret-name" not in str(body)


@pytest.mark.django_db
def test_it_exports_heartbeat_ages_and_backlog_ages_as_gauges(world: Any) -> None:
    _beat("smtp", "mx1:25", spool_depth=1, spool_oldest_age_seconds=42.0)
    _beat("worker", "w@host")
    Heartbeat.objects.filter(kind="worker").update(last_seen=timezone.now() - timedelta(seconds=30))
    message_store(world.mailbox, RAW, received_at=timezone.now() - timedelta(seconds=120))
    content = Client(REMOTE_ADDR="127.0.0.1").get("/metrics").content.decode()
    lines = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in content.splitlines()
        if line.startswith("mailplatform_")
    }
    assert lines['mailplatform_heartbeat_age_seconds{kind="worker",node="w@host"}'] >= 30
    assert lines['mailplatform_heartbeat_age_seconds{kind="smtp",node="mx1:25"}'] < 30
    assert lines['mailplatform_spool_oldest_age_seconds{node="mx1:25"}'] >= 42
    assert lines["mailplatform_unparsed_oldest_age_seconds"] >= 120


@pytest.mark.django_db
def test_it_forgets_a_node_silent_for_a_day(world: Any) -> None:
    from ingest.tasks import ingest_rows_purge

    _beat("smtp", "gone:25")
    _beat("smtp", "here:25")
    Heartbeat.objects.filter(node="gone:25").update(last_seen=timezone.now() - timedelta(days=2))
    ingest_rows_purge()
    assert list(Heartbeat.objects.values_list("node", flat=True)) == ["here:25"]
