"""With a real Celery worker (Redis broker, PostgreSQL): dispatch after commit, and a worker
killed mid-delivery whose delivery the dispatcher completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection, transaction
from django.utils import timezone

from webhooks.models import Attempt, Delivery
from webhooks.tests.conftest import Scripted, make_endpoint, record, verify

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _database_url() -> str:
    settings = connection.settings_dict
    if connection.vendor != "postgresql":
        return f"sqlite:///{settings['NAME']}"
    user, host, port = settings.get("USER") or "postgres", settings.get("HOST") or "127.0.0.1", settings.get("PORT")
    password = f":{settings['PASSWORD']}" if settings.get("PASSWORD") else ""
    return f"postgres://{user}{password}@{host}:{port or 5432}/{settings['NAME']}"


@pytest.fixture
def start_worker() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    from mailplatform.celery import app

    app.control.purge()
    started: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> subprocess.Popen[bytes]:
        environment = {**os.environ, "DATABASE_URL": _database_url(), "LOG_LEVEL": "WARNING", **env}
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "mailplatform",
                "worker",
                "-Q",
                "webhooks",
                "-P",
                "threads",
                "-c",
                "4",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "warning",
            ],
            cwd=ROOT,
            env=environment,
            start_new_session=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    app.control.purge()


def _wait(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def test_it_sends_after_commit_through_the_worker(world, receiver, start_worker):
    _endpoint, secret = make_endpoint(world, receiver.url())
    start_worker()
    with transaction.atomic():
        event = record(world)
        time.sleep(0.5)
        assert receiver.received == []  # nothing leaves before the commit
    (request,) = receiver.wait_for(1, timeout=30)
    assert verify(secret, request)["id"] == event.public_id
    _wait(lambda: Delivery.objects.get(event=event).state == Delivery.State.DELIVERED)


def test_it_completes_a_delivery_whose_worker_was_killed_mid_request(world, receiver, start_worker):
    _endpoint, secret = make_endpoint(world, receiver.url())
    receiver.respond(Scripted(200, delay=20))  # the first request hangs until the worker is gone
    env = {"WEBHOOK_TIMEOUT": "3"}
    first = start_worker(**env)
    event = record(world)
    receiver.wait_for(1, timeout=30)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    delivery = Delivery.objects.get(event=event)
    assert delivery.state == Delivery.State.SENDING  # stranded: claimed by a dead worker
    assert Attempt.objects.filter(delivery=delivery).count() == 0

    # Its lease (WEBHOOK_LEASE, longer than the task could have run) runs out: here at once.
    Delivery.objects.filter(pk=delivery.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    start_worker(**env)
    from webhooks.tasks import deliveries_dispatch

    # The dispatcher (beat runs it every 2 s) reclaims it once the claim's lease has expired.
    deadline = time.monotonic() + 30
    while len(receiver.received) < 2 and time.monotonic() < deadline:
        deliveries_dispatch.delay()
        time.sleep(1)
    requests = receiver.wait_for(2, timeout=5)
    assert requests[1].headers["webhook-id"] == event.public_id
    verify(secret, requests[1])
    _wait(lambda: Delivery.objects.get(pk=delivery.pk).state == Delivery.State.DELIVERED)
    delivery.refresh_from_db()
    assert delivery.attempts == 2  # the lost attempt counts
    assert list(Attempt.objects.filter(delivery=delivery).values_list("succeeded", flat=True)) == [True]


def test_the_filesystem_broker_feeds_the_worker_faster_than_one_round_a_second(world, receiver, start_worker, tmp_path):
    """The embedded default broker: kombu's filesystem transport sleeps its polling interval
    (1 s unless told) whenever the worker's prefetch is full, so a worker of 4 threads took
    about 4 short tasks a second and a burst of mail queued its webhooks for minutes."""
    import json

    from django.conf import settings
    from kombu import Connection

    from webhooks import delivery as sending
    from webhooks.tasks import deliveries_send

    # A DATA_DIR of its own for the broker folder; the secrets stay this test run's.
    environment = {
        "CELERY_BROKER_URL": "filesystem://localhost/",
        "DATA_DIR": str(tmp_path),
        **{name: getattr(settings, name) for name in ("SECRET_KEY", "API_KEY_PEPPER", "FIELD_ENCRYPTION_KEY")},
    }
    options = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from django.conf import settings as s; import json; "
                "print(json.dumps(s.CELERY_BROKER_TRANSPORT_OPTIONS))",
            ],
            cwd=ROOT,
            env={**os.environ, "DJANGO_SETTINGS_MODULE": "mailplatform.settings", **environment},
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    make_endpoint(world, receiver.url())
    count = 60
    for number in range(count):
        record(world, queue_id=f"Q{number}")
    batches = sending.deliveries_claim_due_batches(500, 1)
    assert len(batches) == count
    start_worker(**environment)
    # The worker binds its queue in the broker's control folder; published before, a task is lost.
    _wait(lambda: (Path(options["control_folder"]) / "webhooks.exchange").exists(), timeout=60)
    with Connection("filesystem://localhost/", transport_options=options) as broker:
        for ids, claim in batches:
            deliveries_send.apply_async(args=[ids, claim], connection=broker)
    receiver.wait_for(1, timeout=30)
    first = time.monotonic()
    receiver.wait_for(count, timeout=60)
    assert time.monotonic() - first < 7
    _wait(lambda: Delivery.objects.filter(state=Delivery.State.DELIVERED).count() == count)
