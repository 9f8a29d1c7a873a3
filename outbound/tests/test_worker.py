"""The real worker and real peers: a worker killed with -9 in the middle of a delivery neither
loses nor doubles the message; a 550 at the far end comes back as a DSN from Postfix through
our own runsmtp and becomes ``bounced`` with the address suppressed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from mailplatform.testing import ALL_QUEUES, RunsmtpProcess, start_celery_worker
from outbound.bounces import bounce_mailbox_get_or_create
from outbound.models import Recipient, Suppression
from outbound.tasks import recipients_due_dispatch
from outbound.tests.conftest import BOUNCE_DOMAIN
from outbound.tests.helpers import wait_until


def _worker(env: dict[str, str], name: str) -> Any:
    return start_celery_worker(queue=ALL_QUEUES, name=name, env={**env, "OUTBOUND_BOUNCE_DOMAIN": BOUNCE_DOMAIN})


def test_it_neither_loses_nor_doubles_a_message_when_the_worker_is_killed_mid_delivery(
    world: Any, live_env: dict[str, str], sink: Any, dns_zone: Any, settings: Any
) -> None:
    from outbound.tests.conftest import SINK

    dns_zone.set("remote.example.org", "MX", [(10, "mx.remote.example.org.")])
    dns_zone.set("mx.remote.example.org", "A", ["127.0.0.1"])
    env = {
        **live_env,
        "OUTBOUND_URL": "",
        "OUTBOUND_MX_PORT": str(SINK["port"]),
        "OUTBOUND_ALLOW_PRIVATE": "true",
        "OUTBOUND_CLAIM_LEASE": "8",
        "DNS_RESOLVERS": f"127.0.0.1:{dns_zone.port}",
    }
    sink.rcpt_delay = 30.0  # the remote MX stalls at RCPT: the worker is mid-delivery
    first = _worker(env, "outbound-crash-1")
    body = {"from": "inbox@acme.example.test", "to": ["erin@remote.example.org"], "subject": "Once", "text": "x"}
    response = world.client(world.owner_key).post("/api/v1/messages/send", body, format="json")
    assert response.status_code == 202
    message_id = response.json()["id"]
    try:
        assert sink.rcpt_seen.wait(30), first.output[-2000:]
        os.killpg(first.process.pid, signal.SIGKILL)
        first.process.wait(10)
    finally:
        first.stop()
    recipient = Recipient.objects.get(message_id=message_id)
    assert recipient.state == "queued" and recipient.claimed_until is not None  # the dead worker's claim
    # Beat's sweeper, run here: nothing is due until the dead worker's claim runs out.
    assert recipients_due_dispatch() == 0
    sink.rcpt_delay = 0.0
    second = _worker(env, "outbound-crash-2")
    try:
        # Once the claim runs out the sweeper hands it on, unless a task the new worker was
        # already running took it along first (a delivery task claims other due recipients).
        delivered = Recipient.objects.filter(pk=recipient.pk, state="delivered")
        wait_until(
            lambda: recipients_due_dispatch() == 1 or delivered.exists(), timeout=15, what="the claim to run out"
        )
        wait_until(
            lambda: Recipient.objects.filter(pk=recipient.pk, state="delivered").exists(), timeout=30, what="delivery"
        )
        time.sleep(2)  # a second copy would have arrived by now
    finally:
        second.stop()
    assert sink.counts() == {("erin@remote.example.org", response.json()["message_id"]): 1}
    assert Recipient.objects.get(pk=recipient.pk).attempts == 1  # the killed attempt left no trace


def test_it_turns_a_dsn_from_the_smarthost_into_a_bounce_and_a_suppression(
    world: Any, live_env: dict[str, str], sink: Any, postfix: Any, bounce_port: int, settings: Any, tmp_path: Path
) -> None:
    settings.OUTBOUND_BOUNCE_DOMAIN = BOUNCE_DOMAIN
    bounce_mailbox_get_or_create()
    smtp = RunsmtpProcess(
        port=bounce_port,
        spool_dir=tmp_path / "spool",
        env={
            **live_env,
            "SPOOL_DIR": str(tmp_path / "spool"),
            "INGEST_WORKERS": "1",
            "INGEST_DIRECTORY_REFRESH": "1",
            "INGEST_METRICS_PORT": "0",
            "OUTBOUND_BOUNCE_DOMAIN": BOUNCE_DOMAIN,
        },
    )
    smtp.start()
    worker = _worker({**live_env, "OUTBOUND_URL": f"smtp://127.0.0.1:{postfix.port}"}, "outbound-bounce")
    sink.refuse.add("frank@remote.example.org")
    body = {"from": "inbox@acme.example.test", "to": ["frank@remote.example.org"], "subject": "Hi", "text": "x"}
    try:
        response = world.client(world.owner_key).post("/api/v1/messages/send", body, format="json")
        assert response.status_code == 202
        message_id = response.json()["id"]
        try:
            wait_until(
                lambda: Recipient.objects.filter(message_id=message_id, state="bounced").exists(),
                timeout=60,
                what="the DSN",
            )
        except AssertionError:
            raise AssertionError(
                f"{list(Recipient.objects.values_list('state', 'last_response'))}\n{postfix.log_text()[-2500:]}\n"
                f"{smtp.log_text()[-2000:]}\n{worker.output[-2000:]}"
            ) from None
    finally:
        worker.stop()
        smtp.stop()
    recipient = Recipient.objects.get(message_id=message_id)
    assert recipient.last_response.startswith("DSN: 5.1.1"), recipient.last_response
    assert "550 5.1.1" in recipient.last_response
    suppression = Suppression.objects.get(tenant=world.tenant)
    assert (suppression.address, suppression.reason) == ("frank@remote.example.org", "hard_bounce")
    events = world.client(world.owner_key).get("/api/v1/events/?type=outbound.bounced").json()["results"]
    assert [e["data"]["recipient"] for e in events] == ["frank@remote.example.org"]
