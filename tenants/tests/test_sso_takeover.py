"""A tenant's own identity provider may assert any address it likes. Against the real OpenID
provider: SSO claims only domains the tenant has verified (checked again at every sign-in),
never signs in a staff account, and the session it opens reaches that tenant alone.
"""

from __future__ import annotations

import pytest

from audit.models import AuditEntry
from tenants import selectors
from tenants.access import Principal
from tenants.models import Domain, Membership, SsoDomain, Tenant, User
from tenants.tests.test_sso import enterprise_provider, sign_in, verified_domain

pytestmark = pytest.mark.django_db


@pytest.fixture
def enterprise(world, oidc_provider):
    return enterprise_provider(world, oidc_provider)


@pytest.fixture
def victim(world):
    """Tenant B's owner, on B's own verified domain."""
    verified_domain(world.outsider_tenant, "victim.example.test")
    owner = User.objects.create_user("owner@victim.example.test")
    Membership.objects.create(tenant=world.outsider_tenant, user=owner, role=Membership.Role.OWNER)
    return owner


def _refusals(tenant_id):
    return list(AuditEntry.objects.filter(action="auth.login_failed", tenant_id=tenant_id))


def _assert_takeover_refused(client, world, victim, *, reason):
    # The attacker starts with an address of its own and its provider vouches for B's owner.
    response = sign_in(client, "alice@corp.example.test", login_as=victim.email)
    assert response.status_code == 403
    assert "_auth_user_id" not in client.session
    assert not Membership.objects.filter(user=victim, tenant=world.tenant).exists()
    for tenant in (world.tenant, world.outsider_tenant):  # A tried, B's owner was named
        (entry,) = _refusals(tenant.pk)
        assert entry.actor_label == victim.email
        assert entry.after["reason"] == reason
        assert str(world.tenant.pk) not in str(entry.after)


def _put_sso(world, oidc_provider, domains):
    payload = {
        "issuer": oidc_provider.issuer,
        "client_id": oidc_provider.client_id,
        "client_secret": oidc_provider.client_secret,
        "email_domains": domains,
    }
    return world.client(world.owner_key).put("/api/v1/sso/", payload, format="json")


def test_it_lets_sso_claim_only_domains_the_tenant_has_verified(world, oidc_provider, victim):
    world.tenant.plan = Tenant.Plan.ENTERPRISE
    world.tenant.save()
    Domain.objects.create(tenant=world.tenant, name="pending.example.test")  # added, never verified
    for domains in (["victim.example.test"], ["pending.example.test"], ["nobody.example.test"]):
        response = _put_sso(world, oidc_provider, domains)
        assert response.status_code == 400, response.content
        assert response.json()["error"]["code"] == "sso_domain_not_verified"
    assert not SsoDomain.objects.exists()
    verified_domain(world.tenant, "corp.example.test")
    assert _put_sso(world, oidc_provider, ["corp.example.test"]).status_code == 200


def test_it_refuses_another_tenants_owner_asserted_by_the_tenants_provider(client, enterprise, victim, world):
    _assert_takeover_refused(client, world, victim, reason="sso_claims_refused")


def test_it_refuses_a_claim_on_a_domain_the_tenant_does_not_hold_verified(client, enterprise, victim, world):
    # A claim stored before claims needed verification (or one the tenant's DNS no longer backs).
    SsoDomain.objects.create(name="victim.example.test", provider=enterprise)
    assert selectors.sso_provider_for_email("owner@victim.example.test") is None
    _assert_takeover_refused(client, world, victim, reason="sso_domain_not_verified")


def test_it_never_signs_in_a_staff_account(client, enterprise, world):
    staff = User.objects.create_user("operator@corp.example.test", is_staff=True)
    Membership.objects.create(tenant=world.outsider_tenant, user=staff, role=Membership.Role.MEMBER)
    root = User.objects.create_superuser("root@corp.example.test")
    for account in (staff, root):
        response = sign_in(client, account.email)
        assert response.status_code == 403
        assert "_auth_user_id" not in client.session
        assert client.get("/admin/").status_code == 302  # to the admin's own sign-in
    assert not Membership.objects.filter(tenant=world.tenant, user__in=[staff, root]).exists()
    assert {e.actor_label for e in _refusals(world.tenant.pk)} == {staff.email, root.email}
    assert [e.actor_label for e in _refusals(world.outsider_tenant.pk)] == [staff.email]
    assert [e.actor_label for e in _refusals(None)] == [root.email]  # the platform's own log
    assert all(e.after["reason"] == "sso_staff_refused" for e in AuditEntry.objects.filter(action="auth.login_failed"))


def test_it_never_signs_in_a_deactivated_account(client, enterprise, world):
    User.objects.create_user("alice@corp.example.test", is_active=False)
    assert sign_in(client, "alice@corp.example.test").status_code == 403
    assert "_auth_user_id" not in client.session
    assert _refusals(world.tenant.pk)[-1].after["reason"] == "sso_claims_refused"


def test_it_stops_signing_in_once_the_domain_loses_its_verification(client, enterprise, world, dns_zone):
    from tenants.services import domain_check

    domain = Domain.objects.get(name="corp.example.test")
    assert sign_in(client, "alice@corp.example.test").status_code == 302
    client.logout()

    def txt_record_removed(_client):
        # Between the start and the callback, the next domain check finds the TXT record gone.
        dns_zone.set("corp.example.test", "MX", [(10, "mx1.mailplatform.test")])
        assert domain_check(domain=domain).txt_ok is False

    response = sign_in(client, "alice@corp.example.test", tamper=txt_record_removed)
    assert response.status_code == 403
    assert "_auth_user_id" not in client.session
    assert _refusals(world.tenant.pk)[-1].after["reason"] == "sso_domain_not_verified"
    assert selectors.sso_provider_for_email("alice@corp.example.test") is None  # /login/ offers magic links


def test_it_limits_a_session_opened_by_sso_to_that_tenant(client, enterprise, world):
    alice = User.objects.create_user("alice@corp.example.test")
    Membership.objects.create(tenant=world.outsider_tenant, user=alice, role=Membership.Role.OWNER)
    assert sign_in(client, "alice@corp.example.test").status_code == 302
    assert client.get(f"/console/{world.tenant.slug}/").status_code == 200
    # Alice owns tenant B too, but tenant A's provider vouched for her, not B.
    for path in (
        f"/console/{world.outsider_tenant.slug}/",
        f"/console/{world.outsider_tenant.slug}/keys/",
        f"/inbox/{world.outsider_tenant.slug}/",
        f"/inbox/{world.outsider_tenant.slug}/poll/",
    ):
        assert client.get(path).status_code == 404, path
    home = client.get("/console/")
    assert home.status_code == 302 and home["Location"] == f"/console/{world.tenant.slug}/"
    inbox = client.get("/inbox/").content.decode()
    assert world.outsider_tenant.name not in inbox
    assert world.tenant.name in inbox
    # The sign-in is recorded in tenant A only.
    assert AuditEntry.objects.filter(action="auth.login", tenant_id=world.tenant.pk, actor_label=alice.email).exists()
    assert not AuditEntry.objects.filter(action="auth.login", tenant_id=world.outsider_tenant.pk).exists()


def test_it_gives_a_magic_link_session_every_tenant_again(client, enterprise, world):
    from webinbox.services import login_link_create

    alice = User.objects.create_user("alice@corp.example.test")
    Membership.objects.create(tenant=world.outsider_tenant, user=alice, role=Membership.Role.OWNER)
    assert sign_in(client, "alice@corp.example.test").status_code == 302
    assert client.get(f"/console/{world.outsider_tenant.slug}/").status_code == 404
    link = login_link_create(user=alice, binding="b")
    client.cookies["mp_login_binding"] = "b"
    assert client.post(link.replace("http://testserver", "")).status_code == 302
    assert client.get(f"/console/{world.outsider_tenant.slug}/").status_code == 200


def test_it_keeps_the_principal_of_a_scoped_session_to_its_tenant(world):
    from django.contrib.sessions.backends.db import SessionStore

    from tenants.access import session_memberships, session_reaches, session_scope_limit

    alice = User.objects.create_user("alice@corp.example.test")
    for tenant in (world.tenant, world.outsider_tenant):
        Membership.objects.create(tenant=tenant, user=alice, role=Membership.Role.OWNER)
    session = SessionStore()
    session_scope_limit(session, world.tenant.pk)
    reachable = session_memberships(session, selectors.memberships_of(alice))
    assert [m.tenant_id for m in reachable] == [world.tenant.pk]
    assert [Principal.for_member(m).tenant for m in reachable] == [world.tenant]
    assert session_reaches(session, world.tenant.pk) and not session_reaches(session, world.outsider_tenant.pk)
