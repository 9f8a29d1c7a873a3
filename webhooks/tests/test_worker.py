"""With a real Celery worker (Redis broker, PostgreSQL): dispatch after commit, and a worker
killed mid-delivery whose delivery the dispatcher completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.db import connection, transaction

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
    env = {"WEBHOOK_LEASE": "5", "WEBHOOK_TIMEOUT": "3"}
    first = start_worker(**env)
    event = record(world)
    receiver.wait_for(1, timeout=30)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    delivery = Delivery.objects.get(event=event)
    assert delivery.state == Delivery.State.SENDING  # stranded: claimed by a dead worker
    assert Attempt.objects.filter(delivery=delivery).count() == 0

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
