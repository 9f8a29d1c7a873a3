"""The connector runner against a real Dovecot: IDLE, polling, initial window, reconnects,
UIDVALIDITY changes, flags untouched, auth failures not retried, OAuth2 refresh.

The runner runs in this process (its event loop in a thread, its database threads on the
test database); the tests with several runner processes are in test_connectors_processes.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.core import mail
from django.utils import timezone

from audit.models import Event
from ingest.imap.client import ImapClient
from ingest.imap.runner import Runner
from ingest.models import Connector, ConnectorFolder, ConnectorSeen
from mailboxes.models import Message
from tenants import crypto


def message(number: int, *, subject: str = "", message_id: str | None = None) -> bytes:
    mid = message_id if message_id is not None else f"<m{number}-{time.time_ns()}@source.example>"
    return (
        f"From: sender@source.example\r\nTo: me@source.example\r\nSubject: {subject or f'message {number}'}\r\n"
        f"Message-ID: {mid}\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n\r\nbody {number}\r\n"
    ).encode()


def wait_until(condition: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"not true within {timeout}s: {condition}")


@dataclass
class RunningRunner:
    runner: Runner
    loop: asyncio.AbstractEventLoop
    stop_event: asyncio.Event
    thread: threading.Thread

    def rounds_wait(self, count: int, timeout: float = 10.0) -> None:
        """Until the runner has done ``count`` more lease rounds (renew, claim) from now."""
        target = self.runner.rounds + count
        wait_until(lambda: self.runner.rounds >= target, timeout=timeout, interval=0.02)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(20)
        if self.thread.is_alive():
            import faulthandler
            import sys

            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        assert not self.thread.is_alive()


@pytest.fixture
def runner_settings(settings: Any, tmp_path: Any) -> Any:
    settings.SPOOL_DIR = tmp_path / "spool"
    settings.CONNECTOR_LEASE_SECONDS = 3
    settings.CONNECTOR_STARTUP_STAGGER = 0
    settings.CONNECTOR_BACKOFF_MAX = 1
    settings.CONNECTOR_TIMEOUT = 5
    settings.IMAP_INITIAL_WINDOW = 50
    settings.CONNECTOR_IDLE_SECONDS = 600
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    return settings


@pytest.fixture
def start_runner(transactional_db: Any, runner_settings: Any) -> Iterator[Callable[..., RunningRunner]]:
    started: list[RunningRunner] = []

    def start(**options: Any) -> RunningRunner:
        runner = Runner(**options)
        ready = threading.Event()
        holder: dict[str, Any] = {}

        def run() -> None:
            async def main() -> None:
                holder["loop"] = asyncio.get_running_loop()
                holder["stop"] = asyncio.Event()
                await runner.run(holder["stop"], ready=ready.set)

            asyncio.run(main())

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert ready.wait(10)
        running = RunningRunner(runner, holder["loop"], holder["stop"], thread)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


def connector_for(world: Any, dovecot: Any, account: Any, **fields: Any) -> Connector:
    defaults = {
        "tenant": world.tenant,
        "mailbox": world.mailbox,
        "host": "127.0.0.1",
        "port": dovecot.port,
        "tls_mode": Connector.TlsMode.NONE,
        "username": account.username,
        "password_encrypted": crypto.encrypt(account.password),
        "folders": ["INBOX"],
    }
    return Connector.objects.create(**{**defaults, **fields})


def unreachable_connector(world: Any, username: str = "u") -> Connector:
    """A connector for the lease and take functions alone (no server behind it)."""
    return Connector.objects.create(
        tenant=world.tenant, mailbox=world.mailbox, host="127.0.0.1", port=1, tls_mode="none", username=username,
        password_encrypted=crypto.encrypt("p"), folders=["INBOX"],
    )  # fmt: skip


def imap_messages(mailbox: Any) -> list[Message]:
    return list(Message.objects.filter(mailbox=mailbox, source=Message.Source.IMAP).order_by("received_at"))


def test_it_takes_the_initial_window_then_new_mail_through_idle_leaving_flags_alone(
    world, dovecot, imap_account, start_runner, runner_settings, caplog
):
    runner_settings.IMAP_INITIAL_WINDOW = 2
    for number in range(1, 4):  # three old messages: only the newest two are taken
        imap_account.save(message(number))
    connector = connector_for(world, dovecot, imap_account)
    running = start_runner()
    wait_until(lambda: len(imap_messages(world.mailbox)) == 2)
    assert sorted(m.size for m in imap_messages(world.mailbox)) == sorted(len(message(n)) for n in (2, 3))
    wait_until(lambda: Connector.objects.get(pk=connector.pk).state == Connector.State.IDLE)
    started = time.monotonic()
    imap_account.save(message(4, subject="fresh"))
    wait_until(lambda: len(imap_messages(world.mailbox)) == 3, timeout=3)
    assert time.monotonic() - started < 3
    taken = imap_messages(world.mailbox)[-1]
    assert taken.source == "imap"
    assert taken.storage_key
    # The source mailbox is untouched: nothing marked \Seen (BODY.PEEK[] on EXAMINE).
    assert imap_account.count() == 4
    assert not any("Seen" in flags for flags in imap_account.flags())
    connected = Event.objects.get(type="connector.connected")
    assert connected.data["mode"] == "idle"
    assert Event.objects.filter(type="ingest.received", mailbox_id=world.mailbox.pk).count() == 3
    cursor = ConnectorFolder.objects.get(connector=connector, name="INBOX")
    assert cursor.last_uid == 4
    running.stop()
    assert Connector.objects.get(pk=connector.pk).lease_owner == ""  # released on shutdown
    assert imap_account.password not in caplog.text
    assert imap_account.password not in json.dumps(list(Event.objects.values_list("data", flat=True)))


def test_it_takes_mail_that_arrives_during_a_fetch_without_waiting_for_the_next_idle_round(
    world, dovecot, imap_account, start_runner, monkeypatch
):
    """The server announces such mail (untagged EXISTS) in its answer to the fetch, and not
    again once IDLE starts: the runner looks again before IDLE instead of waiting up to
    CONNECTOR_IDLE_SECONDS (600 here) for the next round."""
    imap_account.save(message(1))
    fetch = ImapClient.uid_fetch_bodies
    announced: list[bool] = []

    async def fetch_while_mail_arrives(self: ImapClient, uids: list[int]) -> list[tuple[int, bytes]]:
        if not announced:  # the second message lands on the server while the first is fetched
            await asyncio.to_thread(imap_account.save, message(2, subject="arrived during the fetch"))
        found = await fetch(self, uids)
        announced.append(self.new_mail_seen)
        return found

    monkeypatch.setattr(ImapClient, "uid_fetch_bodies", fetch_while_mail_arrives)
    connector = connector_for(world, dovecot, imap_account)
    started = time.monotonic()
    start_runner()
    wait_until(lambda: len(imap_messages(world.mailbox)) == 2, timeout=3)
    assert time.monotonic() - started < 3
    assert announced[0] is True  # the scenario happened: EXISTS came in the fetch's answer
    wait_until(lambda: Connector.objects.get(pk=connector.pk).state == Connector.State.IDLE)
    time.sleep(0.3)
    assert len(imap_messages(world.mailbox)) == 2  # each once
    assert imap_account.count() == 2


def test_it_reconnects_after_a_kick_and_takes_nothing_twice(world, dovecot, imap_account, start_runner):
    imap_account.save(message(1))
    connector = connector_for(world, dovecot, imap_account)
    start_runner()
    wait_until(lambda: Connector.objects.get(pk=connector.pk).state == Connector.State.IDLE)
    wait_until(lambda: len(imap_messages(world.mailbox)) == 1)  # spooled before IDLE, drained meanwhile
    imap_account.kick()
    wait_until(lambda: Event.objects.filter(type="connector.error").exists())
    wait_until(lambda: Connector.objects.get(pk=connector.pk).state == Connector.State.IDLE, timeout=5)
    imap_account.save(message(2))
    wait_until(lambda: len(imap_messages(world.mailbox)) == 2, timeout=3)
    time.sleep(0.5)
    assert len(imap_messages(world.mailbox)) == 2
    assert Event.objects.filter(type="connector.connected").count() == 2


def test_it_takes_nothing_twice_when_the_folder_is_recreated_with_a_new_uidvalidity(
    world, dovecot, imap_account, start_runner
):
    imap_account.folder_create("Work")
    old = [message(1), message(2)]
    for content in old:
        imap_account.save(content, folder="Work")
    connector = connector_for(world, dovecot, imap_account, folders=["Work"])
    start_runner()
    wait_until(lambda: len(imap_messages(world.mailbox)) == 2)
    first_validity = ConnectorFolder.objects.get(connector=connector).uid_validity
    imap_account.folder_delete("Work")
    time.sleep(1.1)  # Dovecot's UIDVALIDITY is a timestamp
    imap_account.folder_create("Work")
    for content in old:  # the same mail again (a restore), then a new one
        imap_account.save(content, folder="Work")
    imap_account.save(message(3), folder="Work")
    wait_until(lambda: len(imap_messages(world.mailbox)) == 3, timeout=8)
    time.sleep(0.5)
    assert len(imap_messages(world.mailbox)) == 3
    cursor = ConnectorFolder.objects.get(connector=connector)
    assert cursor.uid_validity != first_validity
    assert cursor.last_uid == 3
    assert ConnectorSeen.objects.filter(connector=connector).count() == 3


def test_it_takes_mail_woken_by_idle_without_opening_the_folder_or_reading_the_cursor_again(
    world, dovecot, imap_account, start_runner, monkeypatch
):
    """The session keeps the folder open and its cursor in memory: an IDLE wake is one
    UID FETCH for the new UIDs and their sizes, one for the bodies, one transaction."""
    from ingest.imap import leases

    calls = {"examine": 0, "cursor_get": 0}
    examine, cursor_get = ImapClient.examine, leases.cursor_get

    async def counted_examine(self: ImapClient, folder: str) -> Any:
        calls["examine"] += 1
        return await examine(self, folder)

    def counted_cursor_get(*args: Any) -> Any:
        calls["cursor_get"] += 1
        return cursor_get(*args)

    monkeypatch.setattr(ImapClient, "examine", counted_examine)
    monkeypatch.setattr(leases, "cursor_get", counted_cursor_get)
    imap_account.save(message(1))
    connector = connector_for(world, dovecot, imap_account)
    start_runner()
    wait_until(lambda: Connector.objects.get(pk=connector.pk).state == Connector.State.IDLE)
    assert calls == {"examine": 1, "cursor_get": 1}
    for number in (2, 3, 4):
        imap_account.save(message(number))
        wait_until(lambda: len(imap_messages(world.mailbox)) == number, timeout=3)  # noqa: B023
    assert calls == {"examine": 1, "cursor_get": 1}
    assert ConnectorFolder.objects.get(connector=connector).last_uid == 4
    assert ConnectorSeen.objects.filter(connector=connector).count() == 4


def test_it_reads_the_cursor_again_when_a_resync_forgot_it_during_the_session(
    world, dovecot, imap_account, start_runner
):
    """The cursor deleted under a running session (a resync, before the runner restarts the
    session): the next take finds it gone, writes nothing, and the session starts the folder
    over from the initial window; what it took already is recognised, not taken twice."""
    imap_account.save(message(1))
    connector = connector_for(world, dovecot, imap_account)
    start_runner()
    wait_until(lambda: Connector.objects.get(pk=connector.pk).state == Connector.State.IDLE)
    ConnectorFolder.objects.filter(connector=connector).delete()  # no generation change: same session
    imap_account.save(message(2))
    wait_until(lambda: len(imap_messages(world.mailbox)) == 2, timeout=3)
    wait_until(lambda: ConnectorFolder.objects.filter(connector=connector, last_uid=2).exists())
    time.sleep(0.3)
    assert len(imap_messages(world.mailbox)) == 2
    assert ConnectorSeen.objects.filter(connector=connector).count() == 2


def test_it_polls_a_server_without_idle(world, start_runner, runner_settings):
    from ingest.tests.dovecot import start_dovecot

    runner_settings.CONNECTOR_POLL_INTERVAL = 1
    server = start_dovecot(idle=False, oauth=False)
    try:
        account = server.account_new()
        connector = connector_for(world, server, account)
        start_runner()
        wait_until(lambda: Connector.objects.get(pk=connector.pk).state == Connector.State.POLLING)
        account.save(message(1))
        wait_until(lambda: len(imap_messages(world.mailbox)) == 1, timeout=4)
        assert Event.objects.get(type="connector.connected").data["mode"] == "polling"
    finally:
        server.stop()


def test_it_stops_at_refused_credentials_with_an_event_and_a_mail_and_no_retry(
    world, dovecot, imap_account, start_runner, caplog
):
    connector = connector_for(world, dovecot, imap_account, password_encrypted=crypto.encrypt("wrong-password-x"))
    running = start_runner()
    wait_until(lambda: Connector.objects.get(pk=connector.pk).state == Connector.State.AUTH_FAILED)
    row = Connector.objects.get(pk=connector.pk)
    assert row.lease_owner == ""
    assert row.last_error_kind == "auth_failed"
    event = Event.objects.get(type="connector.auth_failed")
    assert event.data["connector"] == str(connector.pk)
    wait_until(lambda: len(mail.outbox) == 1)
    assert "wrong-password-x" not in mail.outbox[0].body
    assert world.owner.email in mail.outbox[0].to
    wait_until(lambda: f"user=<{imap_account.username}>" in dovecot.log_text(), timeout=5)
    running.rounds_wait(2)  # two more claim rounds: nobody claims it again, nobody logs in again
    assert dovecot.log_text().count(f"user=<{imap_account.username}>") == 1
    assert Connector.objects.get(pk=connector.pk).lease_owner == ""
    assert Event.objects.filter(type="connector.auth_failed").count() == 1
    assert "wrong-password-x" not in caplog.text


def test_it_refreshes_an_expired_access_token_and_logs_in_with_xoauth2(world, dovecot, imap_account, start_runner):
    tokens = dovecot.tokens
    access, refresh = tokens.grant(imap_account.username)
    tokens.expire(access)
    connector = connector_for(
        world, dovecot, imap_account, auth_type=Connector.AuthType.XOAUTH2, password_encrypted="",
        oauth_client_id="client", oauth_token_url=f"{tokens.url}/token",
        oauth_refresh_token_encrypted=crypto.encrypt(refresh),
        oauth_access_token_encrypted=crypto.encrypt(access),
        oauth_access_token_expires_at=timezone.now() - timedelta(minutes=1),
    )  # fmt: skip
    imap_account.save(message(1))
    start_runner()
    wait_until(lambda: len(imap_messages(world.mailbox)) == 1)
    wait_until(lambda: Connector.objects.get(pk=connector.pk).state == Connector.State.IDLE)
    assert tokens.refreshes == 1
    row = Connector.objects.get(pk=connector.pk)
    assert crypto.decrypt(row.oauth_access_token_encrypted) != access
    assert row.oauth_access_token_expires_at is not None
    assert row.oauth_access_token_expires_at > timezone.now() + timedelta(minutes=30)


def test_it_puts_a_revoked_refresh_token_in_auth_failed(world, dovecot, imap_account, start_runner):
    tokens = dovecot.tokens
    _, refresh = tokens.grant(imap_account.username)
    tokens.revoke(refresh)
    connector = connector_for(
        world, dovecot, imap_account, auth_type=Connector.AuthType.OAUTHBEARER, password_encrypted="",
        oauth_client_id="client", oauth_token_url=f"{tokens.url}/token",
        oauth_refresh_token_encrypted=crypto.encrypt(refresh),
    )  # fmt: skip
    running = start_runner()
    wait_until(lambda: Connector.objects.get(pk=connector.pk).state == Connector.State.AUTH_FAILED)
    assert "invalid_grant" in Connector.objects.get(pk=connector.pk).last_error
    assert Event.objects.filter(type="connector.auth_failed").count() == 1
    requests = len(tokens.token_requests)
    running.rounds_wait(2)
    assert len(tokens.token_requests) == requests  # no retry storm
    wait_until(lambda: len(mail.outbox) == 1)


@pytest.mark.django_db
def test_it_fences_a_runner_whose_lease_was_taken_over(world, runner_settings):
    from ingest.imap import leases

    connector = unreachable_connector(world)
    (first,) = leases.leases_claim(owner="a", limit=5, exclude=set())
    assert leases.leases_claim(owner="b", limit=5, exclude=set()) == []  # held: nobody else gets it
    Connector.objects.filter(pk=connector.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    (second,) = leases.leases_claim(owner="b", limit=5, exclude=set())
    assert second.token == first.token + 1 and second.taken_over
    # The first runner comes back from a pause: its writes are refused, nothing is taken in.
    with pytest.raises(leases.LeaseLost):
        leases.message_take(
            connector_id=connector.pk, token=first.token, folder="INBOX", uid_validity=1, uid=7, content=message(1)
        )
    with pytest.raises(leases.LeaseLost):
        leases.cursor_set(connector_id=connector.pk, token=first.token, folder="INBOX", uid_validity=1, last_uid=9)
    assert leases.leases_renew(owner="a", held={connector.pk: first.token}) == {}
    assert not ConnectorFolder.objects.exists() and not ConnectorSeen.objects.exists()
    # The new holder's writes go through, and the same message twice is taken in once.
    leases.cursor_set(connector_id=connector.pk, token=second.token, folder="INBOX", uid_validity=1, last_uid=0)
    assert leases.message_take(
        connector_id=connector.pk, token=second.token, folder="INBOX", uid_validity=1, uid=7,
        content=message(1, message_id="<same@x>"),
    )  # fmt: skip
    assert (
        leases.message_take(
            connector_id=connector.pk,
            token=second.token,
            folder="INBOX",
            uid_validity=2,
            uid=1,
            content=message(1, message_id="<same@x>"),
        )
        is None
    )
    assert ConnectorFolder.objects.get().last_uid == 1


@pytest.mark.django_db
def test_it_renews_in_one_statement_only_the_leases_held_with_their_token(world, runner_settings):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from ingest.imap import leases

    for number in range(3):
        unreachable_connector(world, username=f"u{number}")
    claims = leases.leases_claim(owner="a", limit=5, exclude=set())
    held = {claim.connector_id: claim.token for claim in claims}
    lost, other, disabled = (claim.connector_id for claim in claims)
    Connector.objects.filter(pk=lost).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert [claim.connector_id for claim in leases.leases_claim(owner="b", limit=5, exclude=set())] == [lost]
    Connector.objects.filter(pk=disabled).update(active=False)
    before = Connector.objects.get(pk=lost).lease_expires_at
    with CaptureQueriesContext(connection) as queries:
        kept = leases.leases_renew(owner="a", held=held)
    assert kept == {other: 1}
    assert len(queries) == 1
    assert Connector.objects.get(pk=lost).lease_expires_at == before  # b's lease untouched
    renewed = Connector.objects.get(pk=other).lease_expires_at
    assert renewed is not None and renewed > timezone.now() + timedelta(seconds=2)
    # A token that is not the one claimed renews nothing, even for the owner.
    assert leases.leases_renew(owner="a", held={other: held[other] + 1}) == {}


@pytest.mark.django_db
def test_it_refuses_a_take_once_the_cursor_is_gone_and_writes_nothing(world, runner_settings):
    from ingest.imap import leases
    from ingest.spool import Spool

    connector = unreachable_connector(world)
    (claim,) = leases.leases_claim(owner="a", limit=5, exclude=set())
    spool = Spool(runner_settings.SPOOL_DIR)
    with pytest.raises(leases.CursorGone):
        leases.messages_take(
            connector_id=connector.pk, token=claim.token, folder="INBOX", uid_validity=1,
            messages=[(1, message(1))], spool=spool,
        )  # fmt: skip
    assert spool.pending() == [] and not ConnectorSeen.objects.exists() and not ConnectorFolder.objects.exists()
    leases.cursor_set(connector_id=connector.pk, token=claim.token, folder="INBOX", uid_validity=1, last_uid=0)
    same = message(2, message_id="<twice@x>")
    taken = leases.messages_take(
        connector_id=connector.pk, token=claim.token, folder="INBOX", uid_validity=1,
        messages=[(1, message(1)), (2, same), (3, None), (4, same)], spool=spool,
    )  # fmt: skip
    assert [bool(queue_id) for queue_id in taken] == [True, True, False, False]
    assert sorted(spool.pending()) == sorted(queue_id for queue_id in taken if queue_id)
    assert ConnectorFolder.objects.get().last_uid == 4
    assert ConnectorSeen.objects.count() == 2


@pytest.mark.django_db
def test_it_tells_readyz_when_connectors_wait_for_a_runner(world):
    from ingest.heartbeats import heartbeat_record, mail_flow_status
    from ingest.models import Heartbeat

    def codes() -> set[str]:
        return {warning["code"] for warning in mail_flow_status()["warnings"]}

    assert "no_live_connector_runner" not in codes()
    Connector.objects.create(
        tenant=world.tenant, mailbox=world.mailbox, host="127.0.0.1", port=1, tls_mode="none", username="u",
        folders=["INBOX"],
    )  # fmt: skip
    assert "no_live_connector_runner" in codes()
    heartbeat_record(kind=Heartbeat.Kind.CONNECTORS, node="runner-1", pid=1, started_at=timezone.now())
    assert "no_live_connector_runner" not in codes()
