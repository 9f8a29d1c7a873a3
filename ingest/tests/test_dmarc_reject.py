"""A domain's dmarc_reject: SMTP mail failing DMARC under p=reject is refused at DATA.

Real sockets (the in-process server), a real DNS server (the Zone), keys and signatures made
here; a DNS failure must defer (451 4.7.0), never refuse.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from typing import Any

import pytest

from ingest.tests.conftest import raw_session
from mailboxes import authentication
from mailboxes.tests import authentication_helpers as helpers
from tenants.models import Domain

pytestmark = pytest.mark.django_db

UNSIGNED = helpers.message(to="inbox@acme.example.test")


@pytest.fixture
def zone(dns_zone: Any, settings: Any) -> Iterator[Any]:
    helpers.zone_prepare(dns_zone, settings)
    # origin.test: p=reject, and SPF allows only another address than ours (127.0.0.1).
    helpers.publish_sender(dns_zone, spf="v=spf1 ip4:192.0.2.1 -all", dmarc="v=DMARC1; p=reject")
    helpers.publish_key(dns_zone, helpers.rsa_key())
    yield dns_zone
    authentication.dns_cache_clear()


def send(server: Any, raw: bytes, *, to: str = "inbox@acme.example.test") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        smtp.ehlo("mail.origin.test")
        smtp.mail("bounce@origin.test")
        smtp.rcpt(to)
        return smtp.data(raw)


def reject_on(world: Any) -> None:
    Domain.objects.filter(pk=world.domain.pk).update(dmarc_reject=True)


def test_it_refuses_a_dmarc_failure_under_p_reject_and_stores_nothing(world: Any, zone: Any, smtp_server: Any) -> None:
    reject_on(world)
    server = smtp_server()

    code, text = send(server, UNSIGNED)

    assert code == 550
    assert text.startswith(b"5.7.1 Message rejected: DMARC policy")
    assert server.spool.pending() == []


def test_it_accepts_what_passes_dmarc_on_an_aligned_signature(world: Any, zone: Any, smtp_server: Any) -> None:
    reject_on(world)
    server = smtp_server()

    code, _ = send(server, helpers.dkim_sign(UNSIGNED, helpers.rsa_key()))

    assert code == 250
    assert len(server.spool.pending()) == 1


@pytest.mark.parametrize(
    "record",
    [
        "v=DMARC1; p=quarantine",
        "v=DMARC1; p=none",
        "v=DMARC1; p=reject; pct=50",  # sampled: refusing every one would be wrong
        None,  # no DMARC record at all
    ],
)
def test_it_accepts_a_failure_the_policy_does_not_ask_to_refuse(
    world: Any, zone: Any, smtp_server: Any, record: str | None
) -> None:
    reject_on(world)
    if record is None:
        zone.clear("_dmarc.origin.test", "TXT")
    else:
        zone.set("_dmarc.origin.test", "TXT", [record])
    server = smtp_server()

    code, _ = send(server, UNSIGNED)

    assert code == 250


def test_it_defers_with_451_when_the_dns_fails_never_refusing(
    world: Any, zone: Any, smtp_server: Any, settings: Any
) -> None:
    reject_on(world)
    server = smtp_server()
    with helpers.failing_dns() as resolver:
        settings.DNS_RESOLVERS = [resolver]
        code, text = send(server, UNSIGNED)

    assert code == 451
    assert text.startswith(b"4.7.0 DMARC could not be checked")
    assert server.spool.pending() == []


def test_it_leaves_domains_without_the_policy_alone(world: Any, zone: Any, smtp_server: Any) -> None:
    server = smtp_server()  # dmarc_reject is off by default

    code, _ = send(server, UNSIGNED)

    assert code == 250


def test_it_refuses_the_whole_transaction_when_one_recipient_asks_for_it(
    world: Any, zone: Any, smtp_server: Any
) -> None:
    reject_on(world)  # acme.example.test asks; outsider.example.test does not
    server = smtp_server()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        smtp.ehlo("mail.origin.test")
        smtp.mail("bounce@origin.test")
        smtp.rcpt("theirs@outsider.example.test")
        smtp.rcpt("inbox@acme.example.test")
        code, _ = smtp.data(UNSIGNED)

    assert code == 550
    assert server.spool.pending() == []


def test_it_does_not_judge_lmtp_mail_that_has_no_connecting_ip_of_the_sender(
    world: Any, zone: Any, smtp_server: Any
) -> None:
    reject_on(world)
    server = smtp_server(lmtp=True)
    lines = raw_session(
        server.port,
        b"LHLO mx.front.test\r\nMAIL FROM:<bounce@origin.test>\r\nRCPT TO:<inbox@acme.example.test>\r\nDATA\r\n"
        + UNSIGNED
        + b".\r\nQUIT\r\n",
        expect=14,
    )

    assert any(line.startswith("250 2.0.0 Ok: queued as") for line in lines), lines
    assert len(server.spool.pending()) == 1


def test_it_lets_a_domain_manager_turn_the_policy_on_through_the_api(world: Any) -> None:
    from audit.models import AuditEntry

    client = world.client(world.owner_key)
    assert client.get(f"/api/v1/domains/{world.domain.pk}/").json()["dmarc_reject"] is False

    response = client.patch(f"/api/v1/domains/{world.domain.pk}/", {"dmarc_reject": True}, format="json")

    assert response.status_code == 200, response.content
    assert response.json()["dmarc_reject"] is True
    assert Domain.objects.get(pk=world.domain.pk).dmarc_reject is True
    entry = AuditEntry.objects.filter(action="domain.update").latest("pk")
    assert entry.after["dmarc_reject"] is True
    assert world.client(world.key(["messages:read"])).patch(
        f"/api/v1/domains/{world.domain.pk}/", {"dmarc_reject": False}, format="json"
    ).status_code in {403, 404}


def test_it_lets_an_owner_turn_the_policy_on_in_the_console_and_not_a_viewer(world: Any) -> None:
    from django.test import Client

    page = f"/console/{world.tenant.slug}/domains/{world.domain.pk}/"
    viewer = Client()
    viewer.force_login(world.viewer)
    assert viewer.post(page, {"action": "dmarc_reject", "enabled": "1"}).status_code == 403
    owner = Client()
    owner.force_login(world.owner)
    assert "Refuse DMARC failures under p=reject" in owner.get(page).content.decode()

    assert owner.post(page, {"action": "dmarc_reject", "enabled": "1"}).status_code == 302

    assert Domain.objects.get(pk=world.domain.pk).dmarc_reject is True
    assert "is <strong>refused</strong>" in owner.get(page).content.decode()
