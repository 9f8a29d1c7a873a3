"""The console's "Mailbox pools" page: metrics, account search, release and reassign, providers."""

from __future__ import annotations

from typing import Any

import pytest

from audit.models import AuditEntry
from mailboxes.bindings import services
from mailboxes.models import AccountBinding, AccountProvider
from tenants.access import Principal

pytestmark = pytest.mark.django_db


def _setup(world: Any) -> tuple[Any, Any]:
    system = Principal.system(world.tenant)
    pool = services.pool_create(principal=system, domain=world.domain, name="signups", size=3)
    bound = services.binding_link_or_create(principal=system, pool=pool, account_ref="acct-42", provider="google")
    return pool, bound.binding


def test_it_shows_pools_with_metrics_and_finds_an_account(world: Any, signed_in: Any) -> None:
    pool, binding = _setup(world)
    owner = signed_in("owner")
    base = f"/console/{world.tenant.slug}/pools/"
    page = owner.get(base, {"account": "acct-42"})
    assert page.status_code == 200
    html = page.content.decode()
    assert "signups" in html and "google 1" in html and binding.mailbox.address in html
    fragment = owner.get(base, {"partial": "1"}).content.decode()
    assert "signups" in fragment and "<nav" not in fragment
    detail = owner.get(f"{base}{pool.pk}/").content.decode()
    assert "acct-42" in detail and binding.mailbox.address in detail


def test_it_keeps_pools_to_their_tenant_and_to_admins(world: Any, signed_in: Any) -> None:
    _setup(world)
    base = f"/console/{world.tenant.slug}/pools/"
    assert signed_in("outsider").get(base).status_code == 404
    assert signed_in("member").get(base).status_code == 403
    other = services.pool_create(
        principal=Principal.system(world.outsider_tenant), domain=world.outsider_domain, name="theirs"
    )
    assert signed_in("owner").get(f"{base}{other.pk}/").status_code == 404


def test_it_releases_and_reassigns_from_the_console_with_an_audit_entry(world: Any, signed_in: Any) -> None:
    pool, binding = _setup(world)
    owner = signed_in("owner")
    base = f"/console/{world.tenant.slug}/pools/{pool.pk}/"
    assert owner.post(base, {"action": "reassign", "binding": binding.pk}).status_code == 302
    moved = AccountBinding.objects.get(account_ref="acct-42", active=True)
    assert moved.mailbox_id != binding.mailbox_id
    assert owner.post(base, {"action": "release", "binding": moved.pk}).status_code == 302
    assert not AccountBinding.objects.filter(account_ref="acct-42", active=True).exists()
    entries = AuditEntry.objects.filter(tenant=world.tenant, action__in=["binding.reassign", "binding.release"])
    assert sorted(entry.action for entry in entries) == ["binding.reassign", "binding.release"]
    assert {entry.actor_type for entry in entries} == {"user"}


def test_it_saves_provider_rules(world: Any, signed_in: Any) -> None:
    owner = signed_in("owner")
    base = f"/console/{world.tenant.slug}/pools/"
    owner.post(
        base,
        {"action": "provider_save", "name": "GitHub", "sender_domains": "github.com\n", "subject_patterns": "code"},
    )
    provider = AccountProvider.objects.get(tenant=world.tenant)
    assert (provider.name, provider.sender_domains, provider.subject_patterns) == ("github", ["github.com"], ["code"])
    bad = owner.post(base, {"action": "provider_save", "name": "x", "subject_patterns": "(unclosed"}, follow=True)
    assert "unclosed" in bad.content.decode() or "missing" in bad.content.decode()
    assert AccountProvider.objects.filter(tenant=world.tenant).count() == 1


def test_it_mints_a_key_limited_to_a_pool_from_the_console(world: Any, signed_in: Any) -> None:
    from django.test import Client

    from tenants.models import ApiKey

    pool, binding = _setup(world)
    other = services.pool_create(principal=Principal.system(world.tenant), domain=world.domain, name="other", size=1)
    owner = signed_in("owner")
    base = f"/console/{world.tenant.slug}/keys/"
    form = owner.get(base).content.decode()
    assert f'value="{pool.pk}"' in form and "signups" in form
    response = owner.post(base, {"name": "pool-key", "permissions": ["bindings:manage"], "pools": [str(pool.pk)]})
    assert response.status_code == 200, response.content.decode()[-2000:]
    key = ApiKey.objects.get(name="pool-key")
    assert list(key.allowed_pools.all()) == [pool]
    assert "pool signups" in owner.get(base).content.decode()
    api = Client(HTTP_AUTHORIZATION=f"Bearer {response.context['minted']['secret']}")
    assert [row["id"] for row in api.get("/api/v1/pools/").json()["results"]] == [str(pool.pk)]
    assert api.get(f"/api/v1/pools/{other.pk}/").status_code == 404
    assert api.get(f"/api/v1/bindings/{binding.pk}/").status_code == 200
    foreign = services.pool_create(
        principal=Principal.system(world.outsider_tenant), domain=world.outsider_domain, name="theirs"
    )
    refused = owner.post(base, {"name": "foreign", "permissions": ["bindings:manage"], "pools": [str(foreign.pk)]})
    assert refused.status_code in (200, 404) and not ApiKey.objects.filter(name="foreign").exists()
