"""Replay reaches the endpoint in event-log order, even with several dispatchers and workers at once."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from django.db import connection

from tenants.access import Principal
from webhooks import delivery as sending
from webhooks.models import Delivery
from webhooks.services import endpoint_replay
from webhooks.tests.conftest import Scripted, make_endpoint, record

pytestmark = pytest.mark.django_db(transaction=True)


def _wait_committed(world: Any, count: int) -> None:
    """Until the log shows ``count`` events (it hides those a running transaction could overtake)."""
    from audit.selectors import event_list

    deadline = time.monotonic() + 60
    while event_list(Principal.system(world.tenant)).count() < count:
        assert time.monotonic() < deadline, "events not visible in the log"
        time.sleep(0.1)


def _dispatcher_and_workers(stop: threading.Event) -> None:
    """One beat dispatcher handing its batches to workers (threads), as deliveries_dispatch does."""
    try:
        with ThreadPoolExecutor(4) as workers:
            while not stop.is_set():
                batches = sending.deliveries_claim_due_batches(500, 50)

                def send(batch: tuple[list[str], str]) -> None:
                    try:
                        sending.deliveries_send(*batch)
                    finally:
                        connection.close()

                list(workers.map(send, batches))
                stop.wait(0.01)
    finally:
        connection.close()


def test_it_replays_to_an_endpoint_in_log_order_with_concurrent_dispatchers(
    world: Any, receiver: Any, settings: Any
) -> None:
    settings.WEBHOOK_REPLAY_RATE = 1000  # every replayed delivery due at once: only the claim orders them
    events = [record(world, "ingest.received", n=n) for n in range(41)]  # about no message: no chain
    endpoint, _ = make_endpoint(world, receiver.url())
    receiver.respond(*[Scripted(200, delay=0.003) for _ in range(40)])
    _wait_committed(world, 41)

    result = endpoint_replay(principal=Principal.system(world.tenant), endpoint=endpoint, after=events[0].public_id)
    assert result.enqueued == 40

    stop = threading.Event()
    dispatchers = [threading.Thread(target=_dispatcher_and_workers, args=(stop,)) for _ in range(3)]
    for thread in dispatchers:
        thread.start()
    try:
        received = receiver.wait_for(40, timeout=60)
    finally:
        stop.set()
        for thread in dispatchers:
            thread.join(30)

    assert [request.headers["webhook-id"] for request in received] == [event.public_id for event in events[1:]]
    assert Delivery.objects.filter(endpoint=endpoint, state=Delivery.State.DELIVERED).count() == 40


def test_it_lets_a_failed_replayed_delivery_retry_without_holding_the_rest_back(world: Any, receiver: Any) -> None:
    events = [record(world, "ingest.received", n=n) for n in range(4)]
    endpoint, _ = make_endpoint(world, receiver.url())
    receiver.respond(Scripted(500))  # the first replayed event fails once
    _wait_committed(world, 4)
    endpoint_replay(principal=Principal.system(world.tenant), endpoint=endpoint, after=events[0].public_id)
    Delivery.objects.filter(origin=Delivery.Origin.REPLAY).update(next_attempt_at=sending.clock.now())

    for ids, claim in sending.deliveries_claim_due_batches(500, 50):
        sending.deliveries_send(ids, claim)

    received = receiver.wait_for(3)
    assert [request.headers["webhook-id"] for request in received] == [event.public_id for event in events[1:]]
    first = Delivery.objects.get(endpoint=endpoint, event__public_id=events[1].public_id)
    assert (first.state, first.attempts) == (Delivery.State.PENDING, 1)  # retried on its schedule
    assert Delivery.objects.filter(endpoint=endpoint, state=Delivery.State.DELIVERED).count() == 2
