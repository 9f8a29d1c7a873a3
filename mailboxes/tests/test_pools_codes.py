"""The code proxy: the right code to the right account, never another account's mail."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from mailboxes.bindings import selectors, services
from mailboxes.models import AccountBinding, MailboxPool
from mailboxes.tests.helpers import message_deliver, simple_message
from tenants.access import Principal
from tenants.services import api_key_mint

PROVIDERS = {
    "google": ("accounts.google.com", "Google <no-reply@accounts.google.com>", "G-{code} is your Google code"),
    "github": ("github.com", "GitHub <noreply@github.com>", "[GitHub] Your verification code {code}"),
    "openai": ("openai.com", "OpenAI <noreply@tm.openai.com>", "Your OpenAI code is {code}"),
}


def _system(world: Any) -> Principal:
    return Principal.system(world.tenant)


def _pool(world: Any, *, size: int = 1, name: str = "accounts", **settings: Any) -> MailboxPool:
    return services.pool_create(principal=_system(world), domain=world.domain, name=name, size=size, **settings)


def _bind(world: Any, pool: MailboxPool, account: str, provider: str) -> services.LinkOrCreate:
    return services.binding_link_or_create(principal=_system(world), pool=pool, account_ref=account, provider=provider)


def _providers(world: Any) -> None:
    for name, (domain, _, _) in PROVIDERS.items():
        services.provider_save(principal=_system(world), name=name, sender_domains=[domain])


def _send(binding: AccountBinding, provider: str, code: str) -> None:
    _, sender, subject = PROVIDERS[provider]
    message_deliver(
        binding.mailbox,
        simple_message(
            subject.format(code=code), f"Your verification code is {code}.", sender=sender, to=binding.mailbox.address
        ),
    )


def _codes_key(world: Any, **resources: Any) -> str:
    _, secret = api_key_mint(
        principal=_system(world), name="host", permissions=["codes:read", "bindings:manage"], **resources
    )
    return secret


def _code(world: Any, key: str, link: str, **params: Any) -> Any:
    return world.client(key).get(f"/api/v1/links/{link}/codes/latest/", params)


def test_it_gives_each_of_three_providers_accounts_in_one_mailbox_its_own_code(world):
    _providers(world)
    pool = _pool(world, size=1, policy=MailboxPool.Policy.SHARED)
    bound = {provider: _bind(world, pool, f"acct-{provider}", provider) for provider in PROVIDERS}
    assert len({result.binding.mailbox_id for result in bound.values()}) == 1  # all three share it
    codes = {"google": "481516", "github": "234234", "openai": "909090"}
    for provider, code in codes.items():
        _send(bound[provider].binding, provider, code)
    key = _codes_key(world)
    for provider, result in bound.items():
        response = _code(world, key, result.link)
        assert response.status_code == 200, response.content
        body = response.json()
        assert body["code"] == codes[provider]
        assert body["account_ref"] == f"acct-{provider}"
        by_account = world.client(key).get(f"/api/v1/accounts/acct-{provider}/codes/latest/")
        assert by_account.json()["code"] == codes[provider]


def test_it_refuses_to_guess_in_a_shared_mailbox_when_the_provider_has_no_rules(world):
    pool = _pool(world, size=1, policy=MailboxPool.Policy.SHARED)
    google = _bind(world, pool, "acct-g", "google")
    _bind(world, pool, "acct-h", "github")
    _send(google.binding, "google", "481516")
    response = _code(world, _codes_key(world), google.link)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "provider_not_configured"


def test_it_does_not_return_a_code_received_before_the_binding(world):
    pool = _pool(world, size=1)
    mailbox = pool.members.get().mailbox
    message_deliver(mailbox, simple_message("Your code", "Your verification code is 111222", to=mailbox.address))
    bound = _bind(world, pool, "acct-late", "google")
    key = _codes_key(world)
    response = _code(world, key, bound.link)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "no_code"
    _send(bound.binding, "google", "333444")
    assert _code(world, key, bound.link).json()["code"] == "333444"
    # since= narrows further, never widens past the binding.
    assert _code(world, key, bound.link, since="2000-01-01T00:00:00Z").json()["code"] == "333444"
    assert _code(world, key, bound.link, since="2999-01-01T00:00:00Z").status_code == 404
    assert _code(world, key, bound.link, since="9288-08-02T06:21:10+22:31").status_code == 404  # in UTC first
    assert _code(world, key, bound.link, since="yesterday").json()["error"]["code"] == "validation_error"


def test_it_answers_a_released_link_404_like_an_unknown_one(world):
    from tenants import keys

    pool = _pool(world, size=1)
    bound = _bind(world, pool, "acct-gone", "google")
    _send(bound.binding, "google", "565656")
    key = _codes_key(world)
    assert _code(world, key, bound.link).status_code == 200
    services.binding_release(principal=_system(world), binding=bound.binding)
    unknown = keys.generate(prefix=keys.LINK_PREFIX).secret
    for link in (bound.link, unknown, "mpl_not-even-a-link"):
        response = _code(world, key, link)
        assert response.status_code == 404, link
        assert response.json()["error"]["code"] == "not_found"
        detail = world.client(key).get(f"/api/v1/links/{link}/")
        assert detail.status_code == 404
        assert detail.json()["error"]["code"] == "not_found"
    assert world.client(key).get("/api/v1/accounts/acct-gone/codes/latest/").status_code == 404


def test_it_moves_future_codes_with_a_reassignment_and_keeps_the_history(world):
    pool = _pool(world, size=2, one_per_provider=False)
    bound = _bind(world, pool, "acct-move", "google")
    old_mailbox = bound.binding.mailbox
    key = _codes_key(world)
    response = world.client(key).post(f"/api/v1/bindings/{bound.binding.pk}/reassign/", {}, format="json")
    assert response.status_code == 200, response.content
    moved = AccountBinding.objects.get(pk=response.json()["id"])
    assert moved.mailbox_id != old_mailbox.pk
    old = AccountBinding.objects.get(pk=bound.binding.pk)
    assert (old.active, old.ended_reason, old.successor_id) == (False, "reassigned", moved.pk)
    # Mail still reaching the old mailbox is not the account's any more; the new mailbox's is.
    message_deliver(
        old_mailbox, simple_message("Your code", "Your verification code is 999111", to=old_mailbox.address)
    )
    assert _code(world, key, bound.link).status_code == 404
    _send(moved, "google", "424242")
    assert _code(world, key, bound.link).json()["code"] == "424242"  # the same link follows the account
    history = world.client(key).get("/api/v1/bindings/", {"account_ref": "acct-move"}).json()["results"]
    assert {(entry["active"], entry["mailbox"]) for entry in history} == {
        (True, str(moved.mailbox_id)),
        (False, str(old_mailbox.pk)),
    }


def test_it_shows_a_key_scoped_to_one_pool_nothing_of_another(world):
    pool_a = _pool(world, name="a")
    pool_b = _pool(world, name="b")
    in_a = _bind(world, pool_a, "acct-a", "google")
    in_b = _bind(world, pool_b, "acct-b", "google")
    _send(in_b.binding, "google", "123987")
    key = _codes_key(world, pools=[pool_a])
    client = world.client(key)
    pools = client.get("/api/v1/pools/").json()["results"]
    assert [pool["id"] for pool in pools] == [str(pool_a.pk)]
    assert client.get(f"/api/v1/pools/{pool_b.pk}/").status_code == 404
    bindings = client.get("/api/v1/bindings/").json()["results"]
    assert [binding["id"] for binding in bindings] == [str(in_a.binding.pk)]
    assert client.get(f"/api/v1/bindings/{in_b.binding.pk}/").status_code == 404
    assert client.post(f"/api/v1/bindings/{in_b.binding.pk}/release/", format="json").status_code == 404
    assert _code(world, key, in_b.link).status_code == 404
    assert client.get(f"/api/v1/links/{in_b.link}/").status_code == 404
    assert client.get("/api/v1/accounts/acct-b/codes/latest/").status_code == 404
    refused = client.post(
        "/api/v1/bindings/link-or-create",
        {"account_ref": "x", "provider": "google", "pool": str(pool_b.pk)},
        format="json",
    )
    assert refused.status_code == 400
    # ...and a pool grant is no grant of the pool's mailboxes or their mail.
    _, reader = api_key_mint(
        principal=_system(world), name="reader", permissions=["messages:read", "codes:read"], pools=[pool_a]
    )
    assert world.client(reader).get("/api/v1/messages/").json()["results"] == []
    assert world.client(reader).get(f"/api/v1/mailboxes/{in_a.binding.mailbox_id}/").status_code == 404


def test_it_rate_limits_the_proxy_per_account(world, settings):
    settings.BINDING_CODES_PER_ACCOUNT = 3
    pool = _pool(world, size=2)
    bound = _bind(world, pool, "acct-busy", "google")
    key = _codes_key(world)
    statuses = [_code(world, key, bound.link).status_code for _ in range(3)]
    assert statuses == [404, 404, 404]
    refused = _code(world, key, bound.link)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused["Retry-After"]) >= 1
    other = _bind(world, pool, "acct-calm", "github")
    assert _code(world, key, other.link).status_code == 404  # another account is not held back


@pytest.mark.parametrize("permission", ["bindings:manage", "messages:read"])
def test_it_needs_codes_read_for_the_proxy(world, permission):
    pool = _pool(world)
    bound = _bind(world, pool, "acct-p", "google")
    _, secret = api_key_mint(principal=_system(world), name="narrow", permissions=[permission])
    response = _code(world, secret, bound.link)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "missing_permission"


def test_it_keeps_the_codes_served_count_past_the_file_caches_default_timeout(tmp_path: Any, settings: Any) -> None:
    # Django's file cache stores an incr again with its default timeout (here one second).
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(tmp_path),
            "TIMEOUT": 1,
        }
    }
    pool_id = uuid.uuid4()
    selectors.codes_served_count(pool_id)
    selectors.codes_served_count(pool_id)
    time.sleep(1.5)
    assert selectors.codes_served_last_day(pool_id) == 2


def test_it_reaches_an_account_whose_ref_holds_a_slash_through_its_percent_encoded_path(world):
    """A host's own account id is opaque: ``a/b?c`` is bound, and found again by its
    percent-encoded path (a slash in it decoded by the server before routing)."""
    from urllib.parse import quote

    _providers(world)
    pool = _pool(world, size=3)
    accounts = {"a/b?c": "135790", "/lead/and/trailing/": "246802", "codes/latest": "112358"}
    for account, code in accounts.items():
        _send(_bind(world, pool, account, "github").binding, "github", code)
    client = world.client(_codes_key(world))
    for account, code in accounts.items():
        response = client.get(f"/api/v1/accounts/{quote(account, safe='')}/codes/latest/")
        assert response.status_code == 200, (account, response.content)
        assert (response.json()["account_ref"], response.json()["code"]) == (account, code)
