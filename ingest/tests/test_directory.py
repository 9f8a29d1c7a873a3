"""The recipient directory never refuses from stale data: misses are asked of the database.

Against a real runsmtp process whose snapshot refreshes only every 60 seconds, so anything
created after it started is known to the database alone.
"""

from __future__ import annotations

import contextlib
import smtplib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from ingest.directory import RecipientDirectory
from mailboxes.tests.factories import MailboxFactory
from tenants.models import Domain
from tenants.tests.factories import TenantFactory

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@contextlib.contextmanager
def smtp_session(port: int) -> Iterator[smtplib.SMTP]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()
        yield smtp


def rcpt_once(smtp: smtplib.SMTP, address: str) -> tuple[int, bytes]:
    smtp.mail("sender@example.org")
    reply = smtp.rcpt(address)
    smtp.rset()
    return reply


def test_it_accepts_mailboxes_and_temporary_inboxes_the_moment_the_api_creates_them(
    world: Any, runsmtp: Any, settings: Any
) -> None:
    from rest_framework.test import APIClient

    settings.TEMP_INBOX_RATE_PER_HOUR = 10_000
    server = runsmtp(INGEST_DIRECTORY_REFRESH="60", INGEST_RATE_PER_IP="0")
    server.start()
    owner = world.client(world.owner_key)
    anonymous = APIClient()
    replies: list[tuple[str, int, bytes]] = []
    with smtp_session(server.port) as smtp:
        for n in range(200):
            created = owner.post(
                "/api/v1/mailboxes/", {"domain": str(world.domain.pk), "local_part": f"fresh{n}"}, format="json"
            )
            assert created.status_code == 201, created.content
            replies.append((created.json()["address"], *rcpt_once(smtp, created.json()["address"])))
        for _ in range(200):  # the first one also creates the temporary-inbox domain itself
            created = anonymous.post("/api/v1/temp-inboxes/", {}, format="json")
            assert created.status_code == 201, created.content
            replies.append((created.json()["address"], *rcpt_once(smtp, created.json()["address"])))
        refused = [(address, code, text) for address, code, text in replies if code != 250]
        assert refused == [], refused[:5]
        assert len(replies) == 400
        # Unknown addresses are still refused, by the database's word.
        code, text = rcpt_once(smtp, "nobody@acme.example.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = rcpt_once(smtp, "someone@not-ours.example.test")
        assert (code, text[:5]) == (550, b"5.7.1")


class PostgresProxy:
    """A TCP relay to PostgreSQL that a test can cut, as a network partition would."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.cut_event = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut_event.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_event.is_set():
                client.close()
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self.cut_event.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close() alone does not)
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_it_answers_451_not_550_for_a_miss_while_the_database_is_unreachable(world: Any, runsmtp: Any) -> None:
    settings_dict = connection.settings_dict
    proxy = PostgresProxy(settings_dict["HOST"] or "127.0.0.1", int(settings_dict["PORT"] or 5432))
    url = f"postgres://{settings_dict['USER']}@127.0.0.1:{proxy.port}/{settings_dict['NAME']}"
    if settings_dict.get("PASSWORD"):
        url = f"postgres://{settings_dict['USER']}:{settings_dict['PASSWORD']}@127.0.0.1:{proxy.port}/{settings_dict['NAME']}"
    server = runsmtp(DATABASE_URL=url, INGEST_DIRECTORY_REFRESH="60", INGEST_DIRECTORY_LOOKUP_TIMEOUT="3")
    server.start("--no-drain")  # the snapshot is loaded before the port opens
    proxy.cut()
    with smtp_session(server.port) as smtp:
        assert rcpt_once(smtp, "inbox@acme.example.test")[0] == 250  # known: accepted from memory
        code, text = rcpt_once(smtp, "created-meanwhile@acme.example.test")
        assert (code, text[:5]) == (451, b"4.3.0")
        code, text = rcpt_once(smtp, "anyone@elsewhere.example.test")
        assert (code, text[:5]) == (451, b"4.3.0")


def test_it_routes_a_name_shared_by_pending_tenants_only_to_its_verified_owner(world: Any, settings: Any) -> None:
    settings.UNVERIFIED_DOMAIN_PLANS = {"developer"}
    first, second = TenantFactory(), TenantFactory()
    for tenant, local in ((first, "one"), (second, "two")):
        MailboxFactory(domain=Domain.objects.create(tenant=tenant, name="shared.example.test"), local_part=local)
    directory = RecipientDirectory()
    assert directory.reload()
    # Two tenants that may receive unverified: nobody has proved the name, so neither gets it.
    assert [directory.decide(f"{local}@shared.example.test").reply.code for local in ("one", "two")] == [550, 550]
    Domain.objects.filter(tenant=second, name="shared.example.test").update(state="verified", updated_at=timezone.now())
    assert directory.reload()
    decision = directory.decide("two@shared.example.test")
    assert (decision.reply.code, decision.tenant_id) == (250, str(second.pk))
    assert directory.decide("one@shared.example.test").reply.text.startswith("5.1.1")  # not the loser's
    Domain.objects.filter(tenant=second, name="shared.example.test").update(state="pending", updated_at=timezone.now())
    second.plan = "enterprise"
    second.save()
    assert directory.reload()
    decision = directory.decide("one@shared.example.test")  # the only one whose plan receives unverified
    assert (decision.reply.code, decision.tenant_id) == (250, str(first.pk))


def test_it_defers_rather_than_refuses_an_address_it_only_remembers_refusing(world: Any) -> None:
    import asyncio
    import time

    directory = RecipientDirectory(negative_ttl=1.0)
    assert directory.reload()
    directory.max_staleness = 3600
    try:
        first = asyncio.run(directory.decide_checked("later@acme.example.test"))
        assert (first.reply.code, first.reply.text[:5]) == (550, "5.1.1")  # the database's own answer
        MailboxFactory(domain=world.domain, local_part="later")  # created right after that refusal
        again = asyncio.run(directory.decide_checked("later@acme.example.test"))
        assert (again.reply.code, again.reply.text[:5]) == (450, "4.1.1")  # remembered: retried, not bounced
        time.sleep(1.1)
        assert asyncio.run(directory.decide_checked("later@acme.example.test")).reply.code == 250
    finally:
        directory.stop()
