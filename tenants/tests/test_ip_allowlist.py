import pytest

from audit.models import AuditEntry
from tenants.models import ApiKey


def get(world, secret, address, **extra):
    return world.client(secret).get("/api/v1/mailboxes/", REMOTE_ADDR=address, **extra)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("203.0.113.7", True),
        ("203.0.113.250", True),
        ("198.51.100.1", False),
        ("2001:db8:1::5", True),
        ("2001:db8:2::5", False),
        ("::ffff:203.0.113.9", True),
    ],
)
def test_it_admits_only_addresses_in_the_tenants_allowlist(world, address, allowed):
    world.tenant.ip_allowlist = ["203.0.113.0/24", "2001:db8:1::/48"]
    world.tenant.save()
    response = get(world, world.owner_key, address)
    assert response.status_code == (200 if allowed else 403)
    if not allowed:
        assert response.json()["error"]["code"] == "ip_not_allowed"


def test_it_narrows_further_with_the_keys_own_list(world):
    world.tenant.ip_allowlist = ["203.0.113.0/24"]
    world.tenant.save()
    narrow = world.key(["messages:read"], name="narrow")
    ApiKey.objects.filter(name="narrow").update(ip_allowlist=["203.0.113.7/32"])
    assert get(world, narrow, "203.0.113.7").status_code == 200
    assert get(world, narrow, "203.0.113.8").status_code == 403
    assert get(world, world.owner_key, "203.0.113.8").status_code == 200


def test_it_ignores_a_spoofed_forwarded_for_without_a_trusted_proxy(world):
    world.tenant.ip_allowlist = ["203.0.113.0/24"]
    world.tenant.save()
    response = get(world, world.owner_key, "198.51.100.1", HTTP_X_FORWARDED_FOR="203.0.113.7")
    assert response.status_code == 403


def test_it_reads_forwarded_for_right_to_left_behind_a_trusted_proxy(world, settings):
    settings.TRUSTED_PROXIES = ["10.0.0.0/8"]
    world.tenant.ip_allowlist = ["203.0.113.0/24"]
    world.tenant.save()
    # The client forged the leftmost entry; the proxies appended the real one.
    forwarded = "203.0.113.99, 198.51.100.1, 10.1.1.1"
    assert get(world, world.owner_key, "10.0.0.2", HTTP_X_FORWARDED_FOR=forwarded).status_code == 403
    honest = "203.0.113.7, 10.1.1.1"
    assert get(world, world.owner_key, "10.0.0.2", HTTP_X_FORWARDED_FOR=honest).status_code == 200


def test_it_sets_the_allowlist_through_the_api_but_never_locks_the_caller_out(world):
    client = world.client(world.owner_key)
    refused = client.patch("/api/v1/tenant/", {"ip_allowlist": ["198.51.100.0/24"]}, REMOTE_ADDR="203.0.113.7")
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "lockout"
    accepted = client.patch(
        "/api/v1/tenant/", {"ip_allowlist": ["203.0.113.7", "2001:db8::/32"]}, REMOTE_ADDR="203.0.113.7"
    )
    assert accepted.status_code == 200
    assert accepted.json()["ip_allowlist"] == ["2001:db8::/32", "203.0.113.7/32"]
    bad = client.patch("/api/v1/tenant/", {"ip_allowlist": ["not-a-network"]}, REMOTE_ADDR="203.0.113.7")
    assert bad.status_code == 400


def test_it_mints_a_key_with_its_own_allowlist(world):
    response = world.client(world.owner_key).post(
        "/api/v1/api-keys/", {"name": "ci", "permissions": ["messages:read"], "ip_allowlist": ["192.0.2.0/24"]}
    )
    assert response.status_code == 201
    assert response.json()["ip_allowlist"] == ["192.0.2.0/24"]
    assert get(world, response.json()["key"], "192.0.2.10").status_code == 200
    assert get(world, response.json()["key"], "192.0.3.10").status_code == 403


def test_it_audits_a_keys_first_use_from_each_address(world):
    get(world, world.owner_key, "192.0.2.1")
    get(world, world.owner_key, "192.0.2.1")
    get(world, world.owner_key, "192.0.2.2")
    entries = AuditEntry.objects.filter(action="api_key.new_ip").order_by("created_at")
    assert [entry.after["ip"] for entry in entries] == ["192.0.2.1", "192.0.2.2"]


def test_it_keeps_the_admin_to_the_staff_allowlist(world, client, settings, admin_user):
    settings.STAFF_IP_ALLOWLIST = ["127.0.0.0/8"]
    from django.test import Client

    from tenants.middleware import StaffIpAllowlistMiddleware  # noqa: F401  (reads the setting at start)

    outside = Client(REMOTE_ADDR="198.51.100.1")
    outside.force_login(admin_user)
    inside = Client(REMOTE_ADDR="127.0.0.1")
    inside.force_login(admin_user)
    assert outside.get("/admin/").status_code == 403
    assert inside.get("/admin/").status_code == 200
