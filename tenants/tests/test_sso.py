"""Per-tenant OIDC single sign-on against a real OpenID provider on loopback."""

from __future__ import annotations

import re
import time
from urllib.parse import parse_qs, urljoin, urlsplit

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from django.core.exceptions import SuspiciousOperation
from django.utils import timezone

from audit.models import AuditEntry
from tenants import crypto, selectors, services, sso
from tenants.access import Principal
from tenants.models import Domain, Membership, SsoProvider, Tenant


def verified_domain(tenant, name):
    """A domain the tenant has proven by DNS (what a passed domain check leaves behind)."""
    return Domain.objects.create(
        tenant=tenant, name=name, state=Domain.State.VERIFIED, txt_ok=True, mx_ok=True, verified_at=timezone.now()
    )


@pytest.fixture
def enterprise(world, oidc_provider):
    return enterprise_provider(world, oidc_provider)


def enterprise_provider(world, oidc_provider):
    """Tenant A on the enterprise plan, corp.example.test verified, SSO through the real provider."""
    world.tenant.plan = Tenant.Plan.ENTERPRISE
    world.tenant.save()
    verified_domain(world.tenant, "corp.example.test")
    provider = services.sso_provider_configure(
        principal=Principal.system(world.tenant),
        issuer=oidc_provider.issuer,
        client_id=oidc_provider.client_id,
        client_secret=oidc_provider.client_secret,
        email_domains=["corp.example.test"],
        scopes="openid email profile groups",
        role_claim="groups",
        role_mapping={"mail-admins": "admin"},
        default_role="viewer",
    )
    return provider


def sign_in(client, email, *, tamper=None, login_as=None):
    """Drive the whole code flow: our start, the provider's login form, our callback.

    ``login_as``: the account the provider then vouches for, if not ``email`` (a tenant's own
    provider may assert any address it likes).
    """
    start = client.get("/login/sso/start/", {"email": email, "next": "/console/"})
    assert start.status_code == 302, start.content
    browser = requests.Session()
    response = browser.get(start["Location"], allow_redirects=False, timeout=10)
    for _ in range(10):
        location = response.headers.get("Location", "")
        if location.startswith("http://testserver/"):
            break
        if response.status_code in (302, 303):
            response = browser.get(urljoin(response.url, location), allow_redirects=False, timeout=10)
            continue
        # The provider's own sign-in (or consent) form: fill it in like a person would.
        action = re.search(r'<form[^>]*action="([^"]+)"', response.text)
        assert action, response.text[:500]
        fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', response.text))
        response = browser.post(
            urljoin(response.url, action.group(1)),
            data={**fields, "login": login_as or email, "password": "any"},
            allow_redirects=False,
            timeout=10,
        )
    callback = urlsplit(response.headers["Location"])
    if tamper:
        tamper(client)
    return client.get(callback.path, parse_qs(callback.query))


def test_it_signs_in_and_creates_the_member_with_the_mapped_role(client, enterprise):
    response = sign_in(client, "alice@corp.example.test")
    assert response.status_code == 302
    assert response["Location"] == "/console/"
    membership = Membership.objects.get(user__email="alice@corp.example.test", tenant=enterprise.tenant)
    assert membership.role == "admin"
    assert int(client.session["_auth_user_id"]) == membership.user_id
    entry = AuditEntry.objects.get(action="auth.login", actor_label="alice@corp.example.test")
    assert entry.after["method"] == "sso"


def test_it_gives_the_default_role_without_a_mapped_group(client, enterprise):
    assert sign_in(client, "bob@corp.example.test").status_code == 302
    assert Membership.objects.get(user__email="bob@corp.example.test").role == "viewer"


def test_it_refuses_a_wrong_nonce(client, enterprise):
    def forget_nonce(test_client):
        session = test_client.session
        for flow in session["sso_flows"].values():
            flow["nonce"] = "not-the-nonce-that-was-sent"
        session.save()

    response = sign_in(client, "alice@corp.example.test", tamper=forget_nonce)
    assert response.status_code == 403
    assert "_auth_user_id" not in client.session
    assert not Membership.objects.filter(user__email="alice@corp.example.test").exists()
    assert AuditEntry.objects.filter(action="auth.login_failed").exists()


def test_it_refuses_a_callback_it_did_not_start(client, enterprise):
    response = client.get("/login/sso/callback/", {"code": "x", "state": "made-up"})
    assert response.status_code == 400
    assert "_auth_user_id" not in client.session


@pytest.mark.parametrize("account", ["eve@corp.example.test", "unverified@corp.example.test"])
def test_it_refuses_an_address_the_tenant_does_not_claim_or_unverified(client, enterprise, account):
    assert sign_in(client, account).status_code == 403
    assert not Membership.objects.filter(tenant=enterprise.tenant, user__email__startswith=account[:3]).exists()


def _token(oidc_provider, key, **overrides):
    now = int(time.time())
    claims = {
        "iss": oidc_provider.issuer,
        "aud": oidc_provider.client_id,
        "sub": "alice@corp.example.test",
        "iat": now,
        "exp": now + 300,
        "nonce": "n-1",
    } | overrides
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": oidc_provider.kid})


def test_it_accepts_only_tokens_signed_by_the_providers_key_for_us_and_in_time(enterprise, oidc_provider):
    backend = sso.TenantOIDCBackend(enterprise)
    good = _token(oidc_provider, oidc_provider.private_key)
    assert backend.verify_token(good, nonce="n-1")["sub"] == "alice@corp.example.test"
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused = {
        "another key": _token(oidc_provider, other_key),
        "expired": _token(
            oidc_provider, oidc_provider.private_key, iat=int(time.time()) - 900, exp=int(time.time()) - 600
        ),
        "another audience": _token(oidc_provider, oidc_provider.private_key, aud="someone-else"),
        "another issuer": _token(oidc_provider, oidc_provider.private_key, iss="http://127.0.0.1:1"),
    }
    for label, token in refused.items():
        with pytest.raises(SuspiciousOperation):
            backend.verify_token(token, nonce="n-1")
        assert label  # each refusal above is one case of the matrix
    with pytest.raises(SuspiciousOperation):
        backend.verify_token(good, nonce="another-nonce")
    hs256 = jwt.encode({"iss": oidc_provider.issuer, "aud": oidc_provider.client_id}, "secret", algorithm="HS256")
    with pytest.raises(SuspiciousOperation):
        backend.verify_token(hs256, nonce="n-1")


def test_it_stores_the_client_secret_encrypted_and_never_audits_it(enterprise, oidc_provider):
    stored = SsoProvider.objects.get(pk=enterprise.pk)
    assert oidc_provider.client_secret not in stored.client_secret_encrypted
    assert crypto.decrypt(stored.client_secret_encrypted) == oidc_provider.client_secret
    entry = AuditEntry.objects.get(action="sso.configure")
    assert oidc_provider.client_secret not in str(entry.after)
    assert entry.after["email_domains"] == ["corp.example.test"]


def test_it_routes_addresses_by_their_domain(enterprise):
    assert selectors.sso_provider_for_email("Someone@CORP.example.test") == enterprise
    assert selectors.sso_provider_for_email("someone@other.example.test") is None


def test_it_refuses_configuration_it_cannot_use(world, oidc_provider, enterprise):
    principal = Principal.system(world.tenant)
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match="discovery"):
        services.sso_provider_configure(
            principal=principal, issuer="http://127.0.0.1:9", client_id="x", email_domains=["corp.example.test"]
        )
    world.outsider_tenant.plan = Tenant.Plan.ENTERPRISE
    world.outsider_tenant.save()
    with pytest.raises(ValidationError, match="not a verified domain of this tenant"):
        services.sso_provider_configure(
            principal=Principal.system(world.outsider_tenant),
            issuer=oidc_provider.issuer,
            client_id="x",
            client_secret="y",
            email_domains=["corp.example.test"],
        )


def test_it_keeps_sso_to_the_enterprise_plan(world, oidc_provider):
    from django.core.exceptions import PermissionDenied

    with pytest.raises(PermissionDenied):
        services.sso_provider_configure(
            principal=Principal.system(world.tenant),
            issuer=oidc_provider.issuer,
            client_id="x",
            client_secret="y",
            email_domains=["corp.example.test"],
        )


def test_it_configures_sso_through_the_api_without_returning_the_secret(world, oidc_provider):
    world.tenant.plan = Tenant.Plan.ENTERPRISE
    world.tenant.save()
    verified_domain(world.tenant, "corp.example.test")
    client = world.client(world.owner_key)
    assert client.get("/api/v1/sso/").status_code == 404
    payload = {
        "issuer": oidc_provider.issuer,
        "client_id": oidc_provider.client_id,
        "client_secret": oidc_provider.client_secret,
        "email_domains": ["Corp.Example.Test"],
        "require_sso": True,
    }
    response = client.put("/api/v1/sso/", payload)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["email_domains"] == ["corp.example.test"]
    assert body["redirect_uri"] == "http://testserver/login/sso/callback/"
    assert oidc_provider.client_secret not in response.content.decode()
    # Updating without a secret keeps the one stored.
    assert client.put("/api/v1/sso/", {**payload, "client_secret": None} | {"require_sso": False}).status_code == 400
    kept = {key: value for key, value in payload.items() if key != "client_secret"} | {"require_sso": False}
    assert client.put("/api/v1/sso/", kept).json()["require_sso"] is False
    assert crypto.decrypt(SsoProvider.objects.get().client_secret_encrypted) == oidc_provider.client_secret
    assert client.delete("/api/v1/sso/").status_code == 204
    assert client.get("/api/v1/sso/").status_code == 404


def test_it_sends_addresses_on_a_claimed_domain_from_the_login_page_to_their_provider(client, enterprise):
    response = client.post("/login/", {"email": "alice@corp.example.test"})
    # Not a redirect (which the page's form-action 'self' would stop in Chromium): a page
    # that navigates on to our own start, which then redirects to the provider.
    assert response.status_code == 200
    start = "/login/sso/start/?email=alice%40corp.example.test"
    assert f'<meta http-equiv="refresh" content="0;url={start}">' in response.content.decode()
    onward = client.get(start)
    assert onward.status_code == 302
    assert onward["Location"].startswith(f"{enterprise.issuer}/auth?")


def test_it_turns_magic_links_off_when_the_tenant_requires_sso(world, enterprise, mailoutbox):
    from tenants.services import membership_set, user_get_or_create
    from webinbox.services import login_link_consume, login_link_create, login_link_send

    alice = user_get_or_create(email="alice@corp.example.test")
    membership_set(tenant=world.tenant, user=alice, role="member", actor=Principal.system(world.tenant).actor)
    old_link = login_link_create(user=alice)
    enterprise.require_sso = True
    enterprise.save()
    assert login_link_send(email="alice@corp.example.test") is False
    assert mailoutbox == []
    assert login_link_consume(token=old_link.rstrip("/").rsplit("/", 1)[-1]) is None
    enterprise.require_sso = False
    enterprise.save()
    assert login_link_send(email="alice@corp.example.test") is True
