"""A resync (or a delete) and a take of the same connector, on two real PostgreSQL connections,
lock its rows in one order (the connector, then its folders), so neither waits for the other
while holding what the other needs: no deadlock, whichever starts first."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, connections
from django.db.models.signals import post_delete

from ingest.imap import leases, services
from ingest.models import Connector, ConnectorFolder
from tenants import crypto
from tenants.access import Principal

pytestmark = pytest.mark.django_db(transaction=True)


def _backend_waits(pid: int, timeout: float = 10.0) -> bool:
    """Whether backend ``pid`` waits for a lock within ``timeout`` (pg_locks is read live)."""
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute("SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted", [pid])
            if cursor.fetchone():
                return True
            time.sleep(0.02)
    return False


def _in_thread(target: Callable[[], Any], outcome: dict[str, Any], name: str) -> threading.Thread:
    def run() -> None:
        try:
            outcome[name] = target()
        except Exception as error:  # the test reads it
            outcome[name] = error
        finally:
            connections.close_all()

    return threading.Thread(target=run, name=name, daemon=True)


@pytest.mark.parametrize("write", ["resync", "delete"])
def test_it_never_deadlocks_a_take_with_a_resync_or_a_delete(world: Any, write: str) -> None:
    connector = Connector.objects.create(
        tenant=world.tenant, mailbox=world.mailbox, host="127.0.0.1", port=1, tls_mode="none", username="u",
        password_encrypted=crypto.encrypt("p"), folders=["INBOX"],
    )  # fmt: skip
    (claim,) = leases.leases_claim(owner="runner", limit=5, exclude=set())
    leases.cursor_set(connector_id=connector.pk, token=claim.token, folder="INBOX", uid_validity=1, last_uid=0)
    outcome: dict[str, Any] = {}
    take_pid: dict[str, int] = {}
    take_may_start = threading.Event()

    def take() -> Any:
        take_pid["pid"] = _pid()
        take_may_start.wait(10)
        # A UID without content moves the cursor alone: the take's locks, nothing spooled.
        return leases.messages_take(
            connector_id=connector.pk, token=claim.token, folder="INBOX", uid_validity=1, messages=[(1, None)]
        )

    def folder_rows_deleted(sender: Any, **kwargs: Any) -> None:
        # The write holds the folder rows now: let the take run until it waits for a lock.
        if threading.current_thread().name == "write" and not take_may_start.is_set():
            take_may_start.set()
            assert _backend_waits(take_pid["pid"]), "the take never waited"

    def written() -> Any:
        principal = Principal.system(world.tenant)
        operation = services.connector_resync if write == "resync" else services.connector_delete
        return operation(principal=principal, connector=Connector.objects.get(pk=connector.pk))

    post_delete.connect(folder_rows_deleted, sender=ConnectorFolder, weak=False)
    try:
        taker = _in_thread(take, outcome, "take")
        taker.start()
        while "pid" not in take_pid and taker.is_alive():
            time.sleep(0.01)
        writer = _in_thread(written, outcome, "write")
        writer.start()
        writer.join(30)
        taker.join(30)
    finally:
        post_delete.disconnect(folder_rows_deleted, sender=ConnectorFolder)
    assert not writer.is_alive() and not taker.is_alive()
    assert take_may_start.is_set()  # the take ran while the write held the folder rows
    assert not isinstance(outcome["write"], Exception), outcome["write"]
    # The take waited for the write, then found the cursor gone (resync) or the lease (delete).
    expected = leases.CursorGone if write == "resync" else leases.LeaseLost
    assert isinstance(outcome["take"], expected), outcome["take"]
    assert not ConnectorFolder.objects.filter(connector_id=connector.pk).exists()


def _pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        row = cursor.fetchone()
    assert row is not None
    return int(row[0])
