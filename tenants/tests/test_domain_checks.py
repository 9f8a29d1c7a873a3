"""Domain verification and MX monitoring against a real DNS server on loopback."""

from datetime import timedelta

import pytest
from django.utils import timezone

from audit.models import Event
from tenants import services
from tenants.models import Domain
from tenants.tests.factories import DomainFactory


@pytest.fixture
def domain(world):
    return DomainFactory(tenant=world.tenant, name="corp.example.test", state=Domain.State.PENDING)


def publish(zone, domain, *, txt=True, mx=True):
    zone.set(domain.name, "TXT", [domain.verification_record, "v=spf1 -all"] if txt else ["v=spf1 -all"])
    if mx:
        zone.set(domain.name, "MX", [(10, "mx1.mailplatform.test.")])
    else:
        zone.set(domain.name, "MX", [(10, "mail.elsewhere.test.")])


def events(domain):
    return list(Event.objects.filter(domain_id=domain.pk).order_by("seq").values_list("type", flat=True))


def test_it_verifies_through_the_api_once_txt_and_mx_are_in_place(
    world, domain, dns_zone, mailoutbox, django_capture_on_commit_callbacks
):
    client = world.client(world.owner_key)
    dns_zone.set(domain.name, "TXT", ["v=spf1 -all"])
    pending = client.post(f"/api/v1/domains/{domain.pk}/verify/").json()
    assert pending["state"] == "pending"
    assert pending["check"] == {"txt": False, "mx": False, "error": None, "state": "pending"}
    publish(dns_zone, domain)
    with django_capture_on_commit_callbacks(execute=True):
        verified = client.post(f"/api/v1/domains/{domain.pk}/verify/").json()
    assert verified["state"] == "verified"
    assert verified["txt_ok"] and verified["mx_ok"]
    assert events(domain) == ["domain.verified"]
    assert [message.to for message in mailoutbox] == [[world.owner.email]]
    assert "corp.example.test" in mailoutbox[0].subject


def test_it_keeps_a_domain_pending_while_its_mx_points_elsewhere(domain, dns_zone):
    publish(dns_zone, domain, mx=False)
    assert services.domain_check(domain=domain).state == "pending"


def test_it_does_not_count_the_implicit_a_record_mx_as_ours(domain, dns_zone):
    dns_zone.set(domain.name, "TXT", [domain.verification_record])
    dns_zone.set(domain.name, "A", ["192.0.2.1"])  # no MX at all: RFC 5321 5.1 falls back to A
    result = services.domain_check(domain=domain)
    assert (result.txt_ok, result.mx_ok, result.state) == (True, False, "pending")


def test_it_goes_soft_when_the_mx_is_lost_and_hard_after_the_grace(world, domain, dns_zone, settings):
    settings.DOMAIN_MX_GRACE = 48 * 3600
    publish(dns_zone, domain)
    now = timezone.now()
    assert services.domain_check(domain=domain, now=now).state == "verified"
    publish(dns_zone, domain, mx=False)
    assert services.domain_check(domain=domain, now=now + timedelta(hours=1)).state == "mx_lost"
    domain.refresh_from_db()
    assert services.domain_check(domain=domain, now=now + timedelta(hours=47)).state == "mx_lost"
    domain.refresh_from_db()
    assert services.domain_check(domain=domain, now=now + timedelta(hours=49, minutes=1)).state == "suspended"
    publish(dns_zone, domain)
    domain.refresh_from_db()
    assert services.domain_check(domain=domain, now=now + timedelta(hours=50)).state == "verified"
    assert events(domain) == ["domain.verified", "domain.mx_lost", "domain.suspended", "domain.mx_restored"]


def test_it_suspends_only_after_a_streak_of_failed_checks_when_the_txt_record_disappears(domain, dns_zone, settings):
    settings.DOMAIN_FAILURE_STREAK, settings.DOMAIN_FAILURE_PERIOD = 3, 3600
    now = timezone.now()
    publish(dns_zone, domain)
    services.domain_check(domain=domain, now=now)
    publish(dns_zone, domain, txt=False, mx=False)
    for minutes in (15, 30, 45):  # three failures, but within less than the period
        domain.refresh_from_db()
        assert services.domain_check(domain=domain, now=now + timedelta(minutes=minutes)).state == "verified"
    domain.refresh_from_db()
    assert (domain.failed_checks, domain.failing_since) == (3, now + timedelta(minutes=15))
    assert services.domain_check(domain=domain, now=now + timedelta(minutes=76)).state == "suspended"
    assert events(domain) == ["domain.verified", "domain.suspended"]


def test_it_never_suspends_a_verified_domain_on_a_single_failed_check(domain, dns_zone, settings):
    settings.DOMAIN_MX_GRACE = 0
    settings.DOMAIN_FAILURE_STREAK, settings.DOMAIN_FAILURE_PERIOD = 1, 0  # asks for the impossible: still two
    publish(dns_zone, domain)
    services.domain_check(domain=domain)
    dns_zone.records.clear()  # NXDOMAIN: the whole zone gone for one answer
    domain.refresh_from_db()
    assert services.domain_check(domain=domain).state == "verified"
    domain.refresh_from_db()
    assert services.domain_check(domain=domain).state == "suspended"  # the second in a row
    publish(dns_zone, domain)
    domain.refresh_from_db()
    services.domain_check(domain=domain)
    publish(dns_zone, domain, mx=False)  # grace 0 used to mean suspended at the first lost MX
    domain.refresh_from_db()
    assert services.domain_check(domain=domain).state == "mx_lost"


def test_it_resets_the_streak_on_a_good_check_and_ignores_dns_failures(domain, dns_zone, settings):
    settings.DOMAIN_FAILURE_STREAK, settings.DOMAIN_FAILURE_PERIOD = 2, 0
    now = timezone.now()
    publish(dns_zone, domain)
    services.domain_check(domain=domain, now=now)
    publish(dns_zone, domain, txt=False)
    domain.refresh_from_db()
    assert services.domain_check(domain=domain, now=now + timedelta(minutes=1)).state == "verified"
    publish(dns_zone, domain)
    domain.refresh_from_db()
    services.domain_check(domain=domain, now=now + timedelta(minutes=2))
    domain.refresh_from_db()
    assert (domain.failed_checks, domain.failing_since) == (0, None)
    publish(dns_zone, domain, txt=False)
    domain.refresh_from_db()
    assert services.domain_check(domain=domain, now=now + timedelta(minutes=3)).state == "verified"
    settings.DNS_RESOLVERS, settings.DNS_TIMEOUT = [("127.0.0.1", 9)], 1  # a timeout is a doubt, not "TXT gone"
    for minutes in (4, 5, 6):
        domain.refresh_from_db()
        assert services.domain_check(domain=domain, now=now + timedelta(minutes=minutes)).error
    domain.refresh_from_db()
    assert (domain.state, domain.failed_checks) == ("verified", 1)


def test_it_never_checks_a_domain_the_platform_serves(world, dns_zone):
    served = DomainFactory(tenant=world.tenant, name="served.example.test", platform_managed=True)
    assert served.pk not in services.domains_due_for_check()
    result = services.domain_check(domain=served)  # nothing published: a tenant domain would fail
    served.refresh_from_db()
    assert (result.state, served.state, served.failed_checks, served.last_checked_at) == (
        "verified",
        "verified",
        0,
        None,
    )


def test_it_restores_from_mx_lost_when_the_mx_comes_back(domain, dns_zone):
    publish(dns_zone, domain)
    services.domain_check(domain=domain)
    publish(dns_zone, domain, mx=False)
    domain.refresh_from_db()
    services.domain_check(domain=domain)
    publish(dns_zone, domain)
    domain.refresh_from_db()
    assert services.domain_check(domain=domain).state == "verified"
    assert events(domain)[-1] == "domain.mx_restored"


def test_it_changes_nothing_when_the_dns_does_not_answer(domain, dns_zone, settings):
    publish(dns_zone, domain)
    services.domain_check(domain=domain)
    settings.DNS_RESOLVERS = [("127.0.0.1", 9)]  # nothing listens there
    settings.DNS_TIMEOUT = 1
    domain.refresh_from_db()
    result = services.domain_check(domain=domain)
    assert result.state == "verified"
    assert result.error
    domain.refresh_from_db()
    assert domain.state == "verified"
    assert domain.last_check_error


def test_it_rechecks_only_domains_whose_check_is_due(domain, dns_zone, settings):
    settings.DOMAIN_CHECK_INTERVAL = 900
    publish(dns_zone, domain)
    assert domain.pk in services.domains_due_for_check()
    services.domain_check(domain=domain)
    assert domain.pk not in services.domains_due_for_check()
    assert domain.pk in services.domains_due_for_check(now=timezone.now() + timedelta(seconds=901))


def test_it_runs_the_beat_task_for_due_domains(domain, dns_zone, settings):
    from tenants import tasks

    publish(dns_zone, domain)
    assert tasks.domain_check(str(domain.pk)) == "verified"
