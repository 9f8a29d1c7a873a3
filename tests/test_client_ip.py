"""Whose address a request comes from, through the real web server command line.

uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise, so behind no proxy
at all anyone on the machine (or a local sidecar relaying traffic) could pick their own
client address. Only TRUSTED_PROXIES decides: these tests start uvicorn with the exact
arguments of `make run` (scripts/run.py) and look at what the address is used for: the
temporary-inbox rate limit, the stored creator IP, the audit trail and STAFF_IP_ALLOWLIST.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from audit.models import AuditEntry
from mailplatform.testing import ROOT, ChildProcess, WebServer, free_port, run_script, wait_for_port
from webinbox.models import TempInbox

FORGED = ("203.0.113.7", "203.0.113.8")


@pytest.fixture
def production_web(live_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WebServer]]:
    """uvicorn started with scripts/run.py's web command, on the test database."""
    started: list[WebServer] = []

    def start(**extra: str) -> WebServer:
        port = free_port()
        env = {
            **live_env,
            # A rate-limit cache of this test's own: counters of earlier runs never count here.
            "CACHE_URL": f"file://{tmp_path / f'cache-{port}'}",
            "TEMP_INBOX_RATE_PER_HOUR": "1",
            "STAFF_IP_ALLOWLIST": "203.0.113.0/24",
            **extra,
        }
        child = ChildProcess(run_script().web_command("127.0.0.1", port), env=env, cwd=ROOT)
        try:
            wait_for_port("127.0.0.1", port, timeout=60)
        except BaseException:
            child.stop()
            raise
        server = WebServer(url=f"http://127.0.0.1:{port}", child=child)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _create_temp_inbox(server: WebServer, forwarded_for: str) -> httpx.Response:
    return httpx.post(f"{server.url}/api/v1/temp-inboxes/", headers={"X-Forwarded-For": forwarded_for}, timeout=30)


@pytest.mark.slow
def test_it_ignores_a_forged_x_forwarded_for_from_loopback_without_trusted_proxies(production_web: Any) -> None:
    server = production_web(TRUSTED_PROXIES="")

    first = _create_temp_inbox(server, FORGED[0])
    assert first.status_code == 201, first.text
    # Another forged address does not buy another inbox: the limit counts the socket's address.
    second = _create_temp_inbox(server, FORGED[1])
    assert second.status_code == 429, second.text
    assert second.json()["error"]["code"] == "rate_limited"
    assert int(second.headers["Retry-After"]) > 0

    assert list(TempInbox.objects.values_list("created_ip", flat=True)) == ["127.0.0.1"]
    audited = set(AuditEntry.objects.filter(action="mailbox.create").values_list("ip", flat=True))
    assert audited == {"127.0.0.1"}
    # STAFF_IP_ALLOWLIST lets 203.0.113.0/24 in; claiming to be there is not being there.
    admin = httpx.get(f"{server.url}/admin/login/", headers={"X-Forwarded-For": FORGED[0]}, timeout=30)
    assert admin.status_code == 403


@pytest.mark.slow
def test_it_believes_x_forwarded_for_from_a_trusted_proxy(production_web: Any) -> None:
    server = production_web(TRUSTED_PROXIES="127.0.0.1")

    assert _create_temp_inbox(server, FORGED[0]).status_code == 201
    assert _create_temp_inbox(server, FORGED[1]).status_code == 201  # two clients, one inbox each
    assert _create_temp_inbox(server, FORGED[1]).status_code == 429

    assert set(TempInbox.objects.values_list("created_ip", flat=True)) == set(FORGED)
    audited = set(AuditEntry.objects.filter(action="mailbox.create").values_list("ip", flat=True))
    assert audited == set(FORGED)
    admin = httpx.get(f"{server.url}/admin/login/", headers={"X-Forwarded-For": FORGED[0]}, timeout=30)
    assert admin.status_code == 200
    outside = httpx.get(f"{server.url}/admin/login/", headers={"X-Forwarded-For": "198.51.100.1"}, timeout=30)
    assert outside.status_code == 403
