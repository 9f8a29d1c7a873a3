"""``manage.py runconnectors`` as real processes: mail indexed within 3 seconds through IDLE
with a real Celery worker, and two runners sharing accounts through leases, one killed -9."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from audit.models import Event
from ingest.models import Connector
from ingest.tests.test_connectors_runner import connector_for, imap_messages, message, wait_until
from mailboxes.models import Message
from mailplatform.testing import ROOT, ChildProcess

pytestmark = pytest.mark.slow

LEASE_SECONDS = 3


@pytest.fixture
def runconnectors(live_env: dict[str, str], tmp_path: Any) -> Iterator[Callable[[str], ChildProcess]]:
    """A factory of ``manage.py runconnectors`` processes on the test database."""
    started: list[ChildProcess] = []

    def start(node: str, *, wait: bool = True) -> ChildProcess:
        env = {
            **live_env,
            "SPOOL_DIR": str(tmp_path / f"spool-{node}"),
            "CONNECTOR_ALLOW_INSECURE": "true",
            "CONNECTOR_LEASE_SECONDS": str(LEASE_SECONDS),
            "CONNECTOR_STARTUP_STAGGER": "0",
            "CONNECTOR_BACKOFF_MAX": "1",
            "HEARTBEAT_INTERVAL": "1",
            "LOG_LEVEL": "INFO",
        }
        process = ChildProcess([sys.executable, "manage.py", "runconnectors", "--node", node], env=env, cwd=ROOT)
        started.append(process)
        if wait:  # else the caller waits (two runners then start side by side)
            process.wait_for_line("runconnectors ready", timeout=30)
        return process

    yield start
    for process in started:
        process.stop()


def test_it_indexes_mail_appended_on_the_server_within_three_seconds(
    world, dovecot, imap_account, runconnectors, celery_worker
):
    connector = connector_for(world, dovecot, imap_account)
    runconnectors("solo")
    wait_until(lambda: Connector.objects.get(pk=connector.pk).state == Connector.State.IDLE, timeout=15)
    from ingest.models import Heartbeat

    assert Heartbeat.objects.filter(kind=Heartbeat.Kind.CONNECTORS, node__startswith="solo:").exists()
    started = time.monotonic()
    imap_account.save(message(1, subject="Your code is 424242"))

    def indexed() -> bool:
        return Event.objects.filter(type="indexer.indexed", mailbox_id=world.mailbox.pk).exists()

    wait_until(indexed, timeout=3)
    elapsed = time.monotonic() - started
    assert elapsed < 3, elapsed
    taken = Message.objects.get(mailbox=world.mailbox)
    assert taken.source == "imap"
    assert taken.subject == "Your code is 424242"
    received = Event.objects.get(type="ingest.received", mailbox_id=world.mailbox.pk)
    assert received.data["source"] == "imap"


def test_it_shares_accounts_between_two_runners_and_takes_over_after_kill_9(world, dovecot, runconnectors):
    accounts = [dovecot.account_new() for _ in range(6)]
    connectors = [connector_for(world, dovecot, account) for account in accounts]
    first, second = runconnectors("alpha", wait=False), runconnectors("beta", wait=False)
    for process in (first, second):
        process.wait_for_line("runconnectors ready", timeout=30)

    def all_idle() -> bool:
        return Connector.objects.filter(pk__in=[c.pk for c in connectors], state=Connector.State.IDLE).count() == 6

    wait_until(all_idle, timeout=15)
    owners = Counter(Connector.objects.filter(pk__in=[c.pk for c in connectors]).values_list("lease_owner", flat=True))
    assert sum(owners.values()) == 6 and all(owners)  # each held by exactly one runner
    for number, account in enumerate(accounts):
        account.save(message(number, subject=f"first {number}"))
    try:
        wait_until(lambda: len(imap_messages(world.mailbox)) == 6, timeout=10)
    except AssertionError:
        raise AssertionError(
            f"{len(imap_messages(world.mailbox))}\n{first.output[-3000:]}\n{second.output[-3000:]}"
        ) from None
    # kill -9 the runner holding the most accounts; the survivor takes them over once the
    # leases expire, and nothing is lost or taken twice.
    alpha_count = sum(count for owner, count in owners.items() if owner.startswith("alpha:"))
    victim, survivor = (first, "beta:") if alpha_count >= 3 else (second, "alpha:")
    import os
    import signal

    os.killpg(victim.process.pid, signal.SIGKILL)
    victim.process.wait(10)
    for number, account in enumerate(accounts):
        account.save(message(100 + number, subject=f"second {number}"))
    killed_at = time.monotonic()

    def all_taken_over() -> bool:
        rows = Connector.objects.filter(pk__in=[c.pk for c in connectors])
        return all(row.lease_owner.startswith(survivor) for row in rows) and len(imap_messages(world.mailbox)) == 12

    wait_until(all_taken_over, timeout=LEASE_SECONDS * 4)
    assert time.monotonic() - killed_at < LEASE_SECONDS * 4
    time.sleep(1)
    subjects = Counter(Message.objects.filter(mailbox=world.mailbox).values_list("size", "sha256"))
    assert len(subjects) == 12 and set(subjects.values()) == {1}
