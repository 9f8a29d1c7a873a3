import csv
import io
import json

from audit.models import AuditEntry


def test_it_lists_the_tenants_audit_trail_newest_first(world):
    client = world.client(world.owner_key)
    client.post("/api/v1/domains/", {"name": "one.example.test"}, REMOTE_ADDR="192.0.2.5", HTTP_USER_AGENT="curl/8")
    client.patch("/api/v1/tenant/", {"name": "Renamed"})
    rows = client.get("/api/v1/audit/").json()["results"]
    actions = [row["action"] for row in rows]
    assert actions.index("tenant.update") < actions.index("domain.create")
    created = next(row for row in rows if row["action"] == "domain.create")
    assert created["ip"] == "192.0.2.5"
    assert created["user_agent"] == "curl/8"
    assert created["actor_type"] == "api_key"
    assert created["after"]["name"] == "one.example.test"
    assert created["correlation_id"]


def test_it_filters_by_action_prefix_actor_and_time(world):
    client = world.client(world.owner_key)
    client.post("/api/v1/domains/", {"name": "one.example.test"})
    client.post("/api/v1/mailboxes/", {"address": "new@acme.example.test"})
    assert {row["action"] for row in client.get("/api/v1/audit/?action=domain.*").json()["results"]} == {
        "domain.create"
    }
    by_key = client.get("/api/v1/audit/?actor=owner key").json()["results"]
    assert {row["action"] for row in by_key} >= {"domain.create", "mailbox.create"}
    assert client.get("/api/v1/audit/?actor=nobody@example.test").json()["results"] == []
    assert client.get("/api/v1/audit/?after=2999-01-01T00:00:00Z").json()["results"] == []
    assert client.get("/api/v1/audit/?after=yesterday").status_code == 400


def test_it_exports_csv_and_json(world):
    client = world.client(world.owner_key)
    client.post("/api/v1/domains/", {"name": "one.example.test"})
    exported = b"".join(client.get("/api/v1/audit/export/?format=csv&action=domain.create").streaming_content)
    [row] = list(csv.DictReader(io.StringIO(exported.decode())))
    assert row["action"] == "domain.create"
    assert json.loads(row["after"])["name"] == "one.example.test"
    as_json = b"".join(client.get("/api/v1/audit/export/?format=json").streaming_content)
    assert "domain.create" in {entry["action"] for entry in json.loads(as_json)}
    assert client.get("/api/v1/audit/export/?format=xml").status_code == 400


def test_it_keeps_the_trail_to_tenant_wide_readers(world):
    member_like = world.key(["messages:read", "events:read"], name="reader")
    assert world.client(member_like).get("/api/v1/audit/").status_code == 403
    outsider_rows = world.client(world.outsider_key).get("/api/v1/audit/").json()["results"]
    assert all(row["action"] != "tenant.update" for row in outsider_rows)
    assert AuditEntry.objects.filter(tenant=world.tenant).exists()


def test_it_never_exports_a_secret(world):
    client = world.client(world.owner_key)
    minted = client.post("/api/v1/api-keys/", {"name": "exported", "permissions": ["messages:read"]}).json()
    exported = b"".join(client.get("/api/v1/audit/export/?format=json").streaming_content).decode()
    assert minted["key"] not in exported
    assert minted["key"][3:] not in exported
