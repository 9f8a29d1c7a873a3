"""The pools and bindings API: link-or-create, metrics, events, keys limited to pools, the wait."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import connection

from audit.models import Event
from mailboxes.bindings import services
from mailboxes.models import AccountBinding, MailboxPool
from mailboxes.tests.helpers import message_deliver, simple_message
from tenants.access import Principal
from tenants.models import ApiKey
from tenants.services import api_key_mint


def _pool(world: Any, client: Any, **body: Any) -> dict[str, Any]:
    response = client.post(
        "/api/v1/pools/", {"name": "accounts", "domain": str(world.domain.pk), **body}, format="json"
    )
    assert response.status_code == 201, response.content
    return dict(response.json())


def _link_or_create(client: Any, pool: dict[str, Any], account: str, provider: str = "google") -> Any:
    return client.post(
        "/api/v1/bindings/link-or-create",
        {"account_ref": account, "provider": provider, "pool": pool["id"]},
        format="json",
    )


def test_it_links_or_creates_idempotently_and_shows_the_link_once(world):
    client = world.client(world.owner_key)
    pool = _pool(world, client, size=3)
    first = _link_or_create(client, pool, "acct-1")
    assert first.status_code == 201, first.content
    body = first.json()
    assert body["created"] is True
    assert body["link"].startswith("mpl_")
    assert body["address"].endswith("@acme.example.test")
    again = _link_or_create(client, pool, "acct-1")
    assert again.status_code == 200
    assert again.json()["id"] == body["id"]
    assert again.json()["link"] is None
    resolved = client.get(f"/api/v1/links/{body['link']}/")
    assert resolved.status_code == 200
    assert (resolved.json()["account_ref"], resolved.json()["address"]) == ("acct-1", body["address"])
    stored = AccountBinding.objects.get(pk=body["id"])
    assert body["link"] not in (stored.link_hash, stored.link_prefix)  # only a keyed hash is kept
    other = _link_or_create(client, pool, "acct-1", provider="github")
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "account_bound"


def test_it_answers_409_pool_exhausted_and_records_it(world):
    client = world.client(world.owner_key)
    pool = _pool(world, client, size=1, policy="dedicated")
    assert _link_or_create(client, pool, "acct-1").status_code == 201
    refused = _link_or_create(client, pool, "acct-2")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "pool_exhausted"
    assert Event.objects.filter(tenant=world.tenant, type="pool.exhausted").count() == 1


def test_it_records_the_binding_events(world):
    client = world.client(world.owner_key)
    pool = _pool(world, client, size=2, one_per_provider=False)
    created = _link_or_create(client, pool, "acct-1").json()
    moved = client.post(f"/api/v1/bindings/{created['id']}/reassign/", {}, format="json").json()
    assert client.post(f"/api/v1/bindings/{moved['id']}/release/").status_code == 200
    events = list(Event.objects.filter(tenant=world.tenant, type__startswith="binding.").order_by("seq"))
    assert [event.type for event in events] == ["binding.created", "binding.reassigned", "binding.released"]
    assert events[1].data["previous"] == created["id"]
    assert str(events[1].mailbox_id) == moved["mailbox"]
    for event in events:
        assert created["link"] not in str(event.data)
    again = client.post(f"/api/v1/bindings/{moved['id']}/release/")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "binding_inactive"


def test_it_shows_live_pool_metrics(world):
    client = world.client(world.owner_key)
    pool = _pool(world, client, size=3, max_bindings_per_mailbox=2, one_per_provider=False)
    for number in range(4):
        _link_or_create(client, pool, f"acct-{number}", provider="github" if number % 2 else "google")
    metrics = client.get(f"/api/v1/pools/{pool['id']}/").json()["metrics"]
    assert metrics["mailboxes"] == 3
    assert metrics["accounts"] == 4
    assert metrics["bindings_per_mailbox"] == {"1": 2, "2": 1}  # least_bound spreads before doubling up
    assert metrics["accounts_per_provider"] == {"github": 2, "google": 2}
    assert metrics["free_places"] == 2
    assert metrics["messages_received_24h"] == 0


def test_it_auto_provisions_below_the_threshold(world, django_capture_on_commit_callbacks):
    client = world.client(world.owner_key)
    pool = _pool(world, client, size=2, policy="dedicated", auto_provision=True, provision_threshold=2, max_mailboxes=5)
    with django_capture_on_commit_callbacks(execute=True):
        _link_or_create(client, pool, "acct-1")
    assert MailboxPool.objects.get(pk=pool["id"]).members.count() == 5  # 1 free < 2: a batch, capped at 5
    events = Event.objects.filter(tenant=world.tenant, type="pool.provisioned").order_by("seq")
    assert [event.data["reason"] for event in events] == ["created", "below threshold"]


def test_it_mints_pool_keys_never_wider_than_their_parent(world):
    system = Principal.system(world.tenant)
    pool_a = services.pool_create(principal=system, domain=world.domain, name="a")
    pool_b = services.pool_create(principal=system, domain=world.domain, name="b")
    minter, _ = api_key_mint(principal=system, name="minter", permissions=["bindings:manage"], pools=[pool_a])
    assert Principal.for_api_key(minter).granted_pool_ids == {pool_a.pk}
    # The minting rule itself, with a pool-limited principal that may mint (through the API a
    # limited key cannot hold keys:manage, so its children come from a tenant-wide key).
    as_parent = dataclasses.replace(
        Principal.for_api_key(minter), permissions=frozenset({"bindings:manage", "keys:manage"})
    )
    child, _ = api_key_mint(principal=as_parent, name="child", permissions=["bindings:manage"])
    assert list(child.allowed_pools.all()) == [pool_a]  # inherited, not the whole tenant
    with pytest.raises(ValidationError) as refused:
        api_key_mint(principal=as_parent, name="wider", permissions=["bindings:manage"], pools=[pool_b])
    assert refused.value.message_dict["resources"][0].startswith("This asks for more than the minting key has.")
    response = world.client(world.owner_key).post(
        "/api/v1/api-keys/",
        {"name": "host", "permissions": ["bindings:manage", "codes:read"], "pools": [str(pool_b.pk)]},
        format="json",
    )
    assert response.status_code == 201, response.content
    assert response.json()["pools"] == [str(pool_b.pk)]
    assert ApiKey.objects.get(pk=response.json()["id"]).allowed_pools.get() == pool_b
    outsider = world.client(world.outsider_key).post(
        "/api/v1/api-keys/",
        {"name": "theirs", "permissions": ["codes:read"], "pools": [str(pool_b.pk)]},
        format="json",
    )
    assert outsider.status_code == 400  # another tenant's pool is unknown


def test_it_answers_a_waiting_host_within_a_second_of_indexing(world, web_server):
    """Through a real uvicorn process: the proxy's long-poll is woken by the index NOTIFY."""
    import httpx

    system = Principal.system(world.tenant)
    pool = services.pool_create(principal=system, domain=world.domain, name="live", size=1)
    bound = services.binding_link_or_create(principal=system, pool=pool, account_ref="acct-live", provider="google")
    _, key = api_key_mint(principal=system, name="host", permissions=["codes:read"], pools=[pool])
    mailbox = bound.binding.mailbox

    def deliver() -> None:
        try:
            message_deliver(mailbox, simple_message("Code", "Your verification code is 246810", to=mailbox.address))
        finally:
            connection.close()

    async def scenario() -> tuple[int, dict[str, Any], float]:
        async with httpx.AsyncClient(base_url=web_server, timeout=30) as client:
            waiter = asyncio.create_task(
                client.get(
                    f"/api/v1/links/{bound.link}/codes/latest/",
                    params={"wait": 20},
                    headers={"Authorization": f"Bearer {key}"},
                )
            )
            await asyncio.sleep(1.0)
            assert not waiter.done()
            await asyncio.to_thread(deliver)
            indexed = time.monotonic()
            response = await waiter
            return response.status_code, response.json(), time.monotonic() - indexed

    status, body, delay = asyncio.run(scenario())
    assert status == 200, body
    assert body["code"] == "246810"
    assert body["account_ref"] == "acct-live"
    assert delay < 1.0
