"""Domain states reach RCPT: DNS changes -> domain checks -> the recipient directory -> SMTP replies."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone

from ingest.tests.test_smtp import rcpt
from mailboxes.tests.factories import MailboxFactory
from tenants import services
from tenants.models import Domain


def publish(zone: Any, domain: Domain, *, txt: bool = True, mx: bool = True) -> None:
    zone.set(domain.name, "TXT", [domain.verification_record] if txt else [])
    zone.set(domain.name, "MX", [(10, "mx1.mailplatform.test." if mx else "mx.elsewhere.test.")])


def test_it_follows_a_domain_from_pending_to_suspended_and_back(world: Any, smtp_server: Any, dns_zone: Any) -> None:
    domain = Domain.objects.create(tenant=world.tenant, name="corp.example.test")
    MailboxFactory(domain=domain, local_part="box")
    server = smtp_server()
    now = timezone.now()

    def answer_after_check(at: Any) -> int:
        domain.refresh_from_db()
        services.domain_check(domain=domain, now=at)
        assert server.directory.reload()
        return rcpt(server, "box@corp.example.test")[0]

    assert rcpt(server, "box@corp.example.test")[0] == 550  # pending: not ours yet
    publish(dns_zone, domain)
    assert answer_after_check(now) == 250  # verified
    publish(dns_zone, domain, mx=False)
    assert answer_after_check(now + timedelta(hours=1)) == 451  # mx_lost: senders retry
    assert answer_after_check(now + timedelta(hours=30)) == 451
    assert answer_after_check(now + timedelta(hours=50)) == 550  # the grace has passed: suspended
    publish(dns_zone, domain)
    assert answer_after_check(now + timedelta(hours=51)) == 250  # restored


def test_it_suspends_once_the_txt_record_stays_gone_for_a_streak_of_checks(
    world: Any, smtp_server: Any, dns_zone: Any, settings: Any
) -> None:
    settings.DOMAIN_FAILURE_STREAK, settings.DOMAIN_FAILURE_PERIOD = 3, 3600
    domain = Domain.objects.create(tenant=world.tenant, name="corp.example.test")
    MailboxFactory(domain=domain, local_part="box")
    server = smtp_server()
    now = timezone.now()
    publish(dns_zone, domain)
    services.domain_check(domain=domain, now=now)
    publish(dns_zone, domain, txt=False, mx=False)
    for hours, expected in ((1, 250), (2, 250), (3, 550)):  # one failed check never bounces mail
        domain.refresh_from_db()
        services.domain_check(domain=domain, now=now + timedelta(hours=hours))
        assert server.directory.reload()
        code, text = rcpt(server, "box@corp.example.test")
        assert code == expected, (hours, text)
    assert text[:5] == b"5.7.1"


def test_it_lets_plans_that_allow_it_receive_for_unverified_domains(
    world: Any, smtp_server: Any, settings: Any
) -> None:
    domain = Domain.objects.create(tenant=world.tenant, name="test-domain.example.test")
    MailboxFactory(domain=domain, local_part="box")
    settings.UNVERIFIED_DOMAIN_PLANS = {"developer"}
    assert rcpt(smtp_server(), "box@test-domain.example.test")[0] == 250
    settings.UNVERIFIED_DOMAIN_PLANS = set()
    assert rcpt(smtp_server(), "box@test-domain.example.test")[0] == 550
