from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from audit.models import AuditEntry
from tenants import keys
from tenants.access import grants_forget
from tenants.models import ApiKey


def test_it_generates_keys_that_scanners_and_the_checksum_recognise():
    generated = keys.generate()
    assert generated.secret.startswith("mp_") and len(generated.secret) == 3 + 32 + 6
    assert keys.is_well_formed(generated.secret)
    tampered = generated.secret[:10] + ("A" if generated.secret[10] != "A" else "B") + generated.secret[11:]
    assert not keys.is_well_formed(tampered)


def test_it_stores_only_a_keyed_hash_of_the_secret(world):
    secret = world.key(["messages:read"], name="stored")
    api_key = ApiKey.objects.get(name="stored")
    assert secret not in str(ApiKey.objects.filter(pk=api_key.pk).values().get())
    assert api_key.prefix == secret[3:11] and api_key.last_four == secret[-4:]
    assert keys.matches(secret, api_key.secret_hash)
    with override_settings(API_KEY_PEPPER="another pepper"):
        assert not keys.matches(secret, api_key.secret_hash)


def test_it_mints_a_key_through_the_api_and_shows_the_secret_once(world):
    client = world.client(world.owner_key)
    response = client.post(
        "/api/v1/api-keys/",
        {"name": "ci", "permissions": ["messages:read"], "mailboxes": [str(world.mailbox.pk)]},
        format="json",
    )
    assert response.status_code == 201, response.content
    created = response.json()
    assert created["key"].startswith("mp_") and created["mailboxes"] == [str(world.mailbox.pk)]
    listed = client.get("/api/v1/api-keys/").json()["results"]
    assert all("key" not in row for row in listed)
    assert created["key"] not in client.get(f"/api/v1/api-keys/{created['id']}/").content.decode()
    entry = AuditEntry.objects.get(action="api_key.create", resource_id=created["id"])
    assert created["key"] not in str(entry.after)
    # The new key works, within its scope.
    mine = world.client(created["key"]).get("/api/v1/mailboxes/").json()["results"]
    assert [row["address"] for row in mine] == ["inbox@acme.example.test"]


def test_it_refuses_a_revoked_key_with_401(world):
    secret = world.key(["messages:read"], name="soon revoked")
    api_key = ApiKey.objects.get(name="soon revoked")
    owner = world.client(world.owner_key)
    assert owner.post(f"/api/v1/api-keys/{api_key.pk}/revoke/").status_code == 200
    response = world.client(secret).get("/api/v1/mailboxes/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "api_key_revoked"
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert AuditEntry.objects.filter(action="api_key.revoke", resource_id=str(api_key.pk)).count() == 1


def test_it_revokes_with_delete_too(world):
    secret = world.key(["messages:read"], name="deleted")
    api_key = ApiKey.objects.get(name="deleted")
    assert world.client(world.owner_key).delete(f"/api/v1/api-keys/{api_key.pk}/").status_code == 204
    assert world.client(secret).get("/api/v1/tenant/").status_code == 401


def test_it_refuses_an_expired_key_with_401(world):
    secret = world.key(["messages:read"], name="old")
    ApiKey.objects.filter(name="old").update(expires_at=timezone.now() - timedelta(seconds=1))
    response = world.client(secret).get("/api/v1/mailboxes/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "api_key_expired"


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "not_authenticated"),
        ("Bearer", "invalid_authorization_header"),
        ("Basic dXNlcjpwYXNz", "invalid_authorization_header"),
        ("Bearer mp_notakey", "invalid_api_key"),
        ("Bearer mp_" + "A" * 38, "invalid_api_key"),
        ("Bearer sk_live_123 extra", "invalid_authorization_header"),
    ],
)
def test_it_answers_401_with_a_stable_code_for_bad_credentials(world, header, code):
    from rest_framework.test import APIClient

    client = APIClient()
    if header is not None:
        client.credentials(HTTP_AUTHORIZATION=header)
    response = client.get("/api/v1/mailboxes/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == code


def test_it_refuses_a_well_formed_key_that_was_never_issued(world):
    response = world.client(keys.generate().secret).get("/api/v1/mailboxes/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_it_ignores_session_cookies_on_the_api(world, client):
    client.force_login(world.owner)
    assert client.get("/api/v1/mailboxes/").status_code == 401


def test_it_records_the_last_use_of_a_key(world):
    secret = world.key(["messages:read"], name="used")
    world.client(secret).get("/api/v1/mailboxes/", REMOTE_ADDR="127.0.0.9")
    api_key = ApiKey.objects.get(name="used")
    assert api_key.last_used_at is not None and api_key.last_used_ip == "127.0.0.9"


def test_it_does_not_let_a_key_grant_permissions_it_lacks(world):
    limited = world.key(["keys:manage", "messages:read"], name="limited")
    response = world.client(limited).post(
        "/api/v1/api-keys/", {"name": "escalate", "permissions": ["domains:manage"]}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "permissions_exceed_parent"
    assert not ApiKey.objects.filter(name="escalate").exists()


def test_it_refuses_tenant_wide_permissions_on_a_scoped_key(world):
    response = world.client(world.owner_key).post(
        "/api/v1/api-keys/",
        {"name": "x", "permissions": ["keys:manage"], "mailboxes": [str(world.mailbox.pk)]},
        format="json",
    )
    assert response.status_code == 400
    assert "permissions" in response.json()["error"]["details"]


def test_it_refuses_another_tenants_mailbox_in_the_allow_list(world):
    response = world.client(world.outsider_key).post(
        "/api/v1/api-keys/",
        {"name": "steal", "permissions": ["messages:read"], "mailboxes": [str(world.mailbox.pk)]},
        format="json",
    )
    assert response.status_code == 400
    assert not ApiKey.objects.filter(name="steal").exists()


def test_it_refuses_every_key_of_a_suspended_tenant(world):
    from audit.services import Actor
    from tenants.services import tenant_set_status

    tenant_set_status(tenant=world.tenant, status="suspended", actor=Actor.system(), reason="abuse")
    response = world.client(world.owner_key).get("/api/v1/mailboxes/")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "tenant_suspended"


def mint(client, **body):
    return client.post("/api/v1/api-keys/", {"name": "child", "permissions": ["messages:read"], **body}, format="json")


@pytest.fixture
def parent(world):
    """A keys:manage key limited to loopback and expiring in two minutes, and its client."""
    expires = timezone.now() + timedelta(minutes=2)
    response = mint(
        world.client(world.owner_key),
        name="parent",
        permissions=["keys:manage", "messages:read"],
        ip_allowlist=["127.0.0.0/8"],
        expires_at=expires.isoformat(),
    )
    assert response.status_code == 201, response.content
    return ApiKey.objects.get(pk=response.json()["id"]), world.client(response.json()["key"])


def test_it_mints_a_child_no_wider_than_its_parent_when_the_request_leaves_limits_out(parent):
    key, client = parent
    response = mint(client)
    assert response.status_code == 201, response.content
    child = ApiKey.objects.get(pk=response.json()["id"])
    assert child.parent == key and response.json()["parent"] == str(key.pk)
    assert child.ip_allowlist == ["127.0.0.0/8"]
    assert child.expires_at == key.expires_at


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"ip_allowlist": ["0.0.0.0/0"]}, "ip_allowlist_exceeds_parent"),
        ({"ip_allowlist": ["127.0.0.1/32", "192.0.2.0/24"]}, "ip_allowlist_exceeds_parent"),
        ({"expires_at": "2999-01-01T00:00:00Z"}, "expiry_exceeds_parent"),
        ({"permissions": ["messages:read", "domains:manage"]}, "permissions_exceed_parent"),
    ],
)
def test_it_refuses_a_child_wider_than_its_parent_with_a_stable_code(parent, body, code):
    _, client = parent
    response = mint(client, **body)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == code
    assert not ApiKey.objects.filter(name="child").exists()


def test_it_lets_a_child_narrow_its_parent(parent):
    key, client = parent
    soon = key.expires_at - timedelta(seconds=30)
    response = mint(client, ip_allowlist=["127.0.0.1"], expires_at=soon.isoformat())
    assert response.status_code == 201, response.content
    assert response.json()["ip_allowlist"] == ["127.0.0.1/32"]


def test_it_revokes_the_children_with_their_parent(world, parent):
    key, client = parent
    child_secret = mint(client, permissions=["keys:manage", "messages:read"]).json()["key"]
    grandchild = mint(world.client(child_secret), name="grandchild").json()
    assert world.client(grandchild["key"]).get("/api/v1/mailboxes/").status_code == 200
    assert world.client(world.owner_key).post(f"/api/v1/api-keys/{key.pk}/revoke/").status_code == 200
    response = world.client(child_secret).get("/api/v1/mailboxes/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "api_key_revoked"
    assert ApiKey.objects.filter(parent=key, revoked_at__isnull=True).count() == 0
    assert ApiKey.objects.get(pk=grandchild["id"]).revoked_at is not None
    assert world.client(grandchild["key"]).get("/api/v1/mailboxes/").status_code == 401


def test_it_refuses_a_child_once_its_parent_is_revoked_or_expired_even_if_the_child_is_not(world, parent):
    key, client = parent
    child = mint(client).json()
    ApiKey.objects.filter(pk=child["id"]).update(expires_at=None, ip_allowlist=[])  # as minted before the rule
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    response = world.client(child["key"]).get("/api/v1/mailboxes/")
    assert (response.status_code, response.json()["error"]["code"]) == (401, "api_key_expired")
    ApiKey.objects.filter(pk=key.pk).update(expires_at=None, revoked_at=timezone.now())
    response = world.client(child["key"]).get("/api/v1/mailboxes/")
    assert (response.status_code, response.json()["error"]["code"]) == (401, "api_key_revoked")


def test_it_holds_a_child_to_its_parents_ip_allowlist_at_authentication(world, parent):
    key, client = parent
    child = mint(client).json()
    ApiKey.objects.filter(pk=child["id"]).update(ip_allowlist=[])  # as minted before the rule
    ApiKey.objects.filter(pk=key.pk).update(ip_allowlist=["192.0.2.0/24"])
    response = world.client(child["key"]).get("/api/v1/mailboxes/")
    assert (response.status_code, response.json()["error"]["code"]) == (403, "ip_not_allowed")


def test_it_gives_a_scoped_parents_child_the_parents_resources_when_none_are_asked(world):
    from tenants import keys as key_format

    generated = key_format.generate()
    scoped = ApiKey.objects.create(
        tenant=world.tenant,
        name="scoped manager",
        prefix=generated.prefix,
        secret_hash=generated.secret_hash,
        last_four=generated.last_four,
        permissions=["keys:manage", "messages:read"],
    )
    scoped.allowed_mailboxes.set([world.mailbox])
    response = mint(world.client(generated.secret))
    assert response.status_code == 201, response.content
    assert response.json()["mailboxes"] == [str(world.mailbox.pk)]
    outside = mint(world.client(generated.secret), name="wider", mailboxes=[str(world.sibling.pk)])
    assert outside.status_code == 400


def test_a_key_scoped_to_deleted_resources_reaches_nothing_rather_than_the_whole_tenant(world):
    scoped = world.key(["messages:read", "mailboxes:manage"], mailboxes=[world.sibling], name="one mailbox")
    client = world.client(scoped)
    assert [row["id"] for row in client.get("/api/v1/mailboxes/").json()["results"]] == [str(world.sibling.pk)]
    owner = world.client(world.key())
    assert owner.delete(f"/api/v1/mailboxes/{world.sibling.pk}/").status_code == 204
    grants_forget()  # as another process, or this one a minute later, knows it
    listed = client.get("/api/v1/mailboxes/")
    assert listed.status_code == 200
    assert listed.json()["results"] == []
    assert client.get(f"/api/v1/mailboxes/{world.mailbox.pk}/").status_code == 404
    assert client.get("/api/v1/messages/").json()["results"] == []
