"""Metrics in multiprocess mode (METRICS_DIR) with every process shape Celery runs."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from mailplatform.testing import ROOT, ChildProcess

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_it_keeps_the_embedded_beat_of_a_worker_alive(live_env: dict[str, str], world: Any, tmp_path: Any) -> None:
    from audit.services import event_record
    from tenants.access import Principal
    from webhooks.models import Delivery
    from webhooks.services import endpoint_create

    # make run's shape: one worker with its beat embedded (-B), forked by billiard, which
    # closes the descriptors the child inherits, the metrics files' among them.
    worker = ChildProcess(
        [sys.executable, "-m", "celery", "-A", "mailplatform", "worker", "-B", "-Q", "webhooks", "-c", "1",
         "-l", "INFO", "-s", str(tmp_path / "beat-schedule"), "--without-gossip", "--without-mingle",
         "--without-heartbeat"],
        env=live_env,
        cwd=ROOT,
    )  # fmt: skip
    try:
        worker.wait_for_line(" ready.", timeout=120)
        # A due delivery straight into the table: only the beat's dispatch tick finds it.
        event = event_record(tenant_id=world.tenant.pk, type="test.event", mailbox_id=world.mailbox.pk)
        endpoint, _ = endpoint_create(principal=Principal.system(world.tenant), url="http://127.0.0.1:9/hook")
        delivery = Delivery.objects.create(
            tenant=world.tenant, endpoint=endpoint, event=event, next_attempt_at=timezone.now() - timedelta(seconds=1)
        )
        deadline = time.monotonic() + 30
        while Delivery.objects.get(pk=delivery.pk).attempts == 0:
            assert time.monotonic() < deadline, worker.output[-3000:]
            time.sleep(0.2)
    finally:
        worker.stop()
    assert "Bad file descriptor" not in worker.output
    assert "beat raised exception" not in worker.output


def test_it_shares_one_metrics_folder_between_the_compose_services() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    folder = compose["x-env"]["METRICS_DIR"]
    django = {
        name
        for name, service in compose["services"].items()
        if any(word in " ".join(service.get("command") or []) for word in ("manage.py", "celery", "uvicorn"))
    }
    assert django == {"migrate", "web", "smtp", "submission", "connectors", "imap", "pop3", "worker", "beat"}
    for name in django:
        assert f"metrics:{folder}" in compose["services"][name].get("volumes", []), name
    assert compose["volumes"]["metrics"]["driver_opts"]["type"] == "tmpfs"  # empty at each start
