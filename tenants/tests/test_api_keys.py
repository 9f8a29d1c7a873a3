from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from audit.models import AuditEntry
from tenants import keys
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
    assert response.status_code == 403
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
