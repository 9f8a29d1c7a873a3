"""What the real servers print: no credential in any line, no line per idle beat tick."""

from __future__ import annotations

import re
import sys
import time
from datetime import timedelta
from typing import Any

import pytest
import requests
from django.utils import timezone

from mailplatform.testing import ROOT, ChildProcess, start_uvicorn

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_it_never_logs_the_tokens_in_request_paths(live_env: dict[str, str], world: Any, log_format: str) -> None:
    from webinbox.services import login_link_create, temp_inbox_create

    _, temp_token = temp_inbox_create(ip="127.0.0.1")
    login_token = login_link_create(user=world.owner).rstrip("/").rsplit("/", 1)[1]
    unknown_token = "U" * 43  # answered 404, which django.request logs with the path
    from tenants import keys

    link = keys.generate(prefix=keys.LINK_PREFIX).secret  # a binding's link, well formed
    server = start_uvicorn(env={**live_env, "LOG_LEVEL": "INFO", "LOG_FORMAT": log_format})
    try:
        with requests.Session() as session:
            for path in (
                f"/t/{temp_token}/",
                f"/t/{temp_token}/poll/?since=x",
                f"/t/{unknown_token}/",
                f"/login/link/{login_token}/",
                f"/login/link/{unknown_token}/",
                f"/blobs/{unknown_token}/",
                f"/api/v1/links/{link}/",
                f"/api/v1/links/{link}/codes/latest/?wait=0",
                f"/healthz?token={unknown_token}Q&signature={unknown_token}S",
            ):
                session.get(server.url + path, allow_redirects=False, timeout=20)
        # The access line of the last request is written after its response: wait for it.
        deadline = time.monotonic() + 10
        while "/healthz" not in server.child.output and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.stop()
    output = server.child.output
    assert "/healthz" in output and "Not Found" in output, output[-3000:]  # the lines were printed
    for token in (temp_token, login_token, unknown_token, link):
        assert token not in output, output[-3000:]
    assert "/t/[redacted]/" in output and "/login/link/[redacted]/" in output and "/blobs/[redacted]/" in output
    assert "/api/v1/links/[redacted]/codes/latest/" in output
    assert "token=[redacted]" in output and "signature=[redacted]" in output


# Celery's lines about one run (not the start-up banner's list of tasks).
_TICK_LINE = r"Task webhooks\.tasks\.deliveries_dispatch\[|Sending due task webhooks-dispatch"
_OTHER_TICKS = r"Sending due task outbound-dispatch"  # every 5 seconds


def test_it_logs_the_webhook_dispatch_tick_only_when_it_did_work(live_env: dict[str, str], world: Any) -> None:
    from audit.services import event_record
    from tenants.access import Principal
    from webhooks.models import Delivery
    from webhooks.services import endpoint_create

    # The compose file's shape: a worker and one beat, whose dispatch tick comes every 2 seconds.
    celery = [sys.executable, "-m", "celery", "-A", "mailplatform"]
    worker = ChildProcess(
        [*celery, "worker", "-Q", "webhooks", "-c", "1", "-l", "INFO",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        env=live_env,
        cwd=ROOT,
    )  # fmt: skip
    beat = ChildProcess([*celery, "beat", "-l", "INFO"], env=live_env, cwd=ROOT)
    try:
        worker.wait_for_line(" ready.", timeout=120)
        beat.wait_for_line("beat: Starting...", timeout=60)
        time.sleep(6.5)  # three idle ticks of the webhook dispatcher, one of the outbound one
        idle = [line for line in worker.lines + beat.lines if re.search(f"{_TICK_LINE}|{_OTHER_TICKS}", line)]
        # Now a due delivery (straight into the table, so only the dispatcher can find it).
        event = event_record(tenant_id=world.tenant.pk, type="test.event", mailbox_id=world.mailbox.pk)
        endpoint, _ = endpoint_create(principal=Principal.system(world.tenant), url="http://127.0.0.1:9/hook")
        Delivery.objects.create(
            tenant=world.tenant, endpoint=endpoint, event=event, next_attempt_at=timezone.now() - timedelta(seconds=1)
        )
        worker.wait_for_line("Task webhooks.tasks.deliveries_dispatch[", timeout=30)
    finally:
        beat.stop()
        worker.stop()
    assert idle == [], idle
    worked = [line for line in worker.lines + beat.lines if re.search(_TICK_LINE, line)]
    assert len(worked) == 1 and "succeeded" in worked[0] and worked[0].endswith(": 1"), worked


def test_it_redacts_every_credential_shape_in_a_line() -> None:
    from mailplatform.logs import redact
    from tenants import keys

    for prefix in (keys.PREFIX, keys.LINK_PREFIX, "mpa_"):  # API key, binding link, app password
        secret = keys.generate(prefix=prefix).secret
        assert redact(f"login with {secret} failed") == "login with [redacted] failed"
    assert redact("GET /api/v1/links/mpl_x/codes/latest/ 404") == "GET /api/v1/links/[redacted]/codes/latest/ 404"
    assert redact("GET /api/v1/accounts/acct-7/codes/latest/") == "GET /api/v1/accounts/acct-7/codes/latest/"
