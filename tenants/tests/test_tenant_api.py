from audit.models import AuditEntry


def test_it_changes_the_tenants_retention_days_and_audits_it(world):
    client = world.client(world.owner_key)
    response = client.patch("/api/v1/tenant/", {"retention_days": 14}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["retention_days"] == 14
    world.tenant.refresh_from_db()
    assert world.tenant.retention_days == 14
    assert client.get("/api/v1/tenant/").json()["retention_days"] == 14
    entry = AuditEntry.objects.filter(tenant=world.tenant, action="tenant.update").latest("created_at")
    assert entry.before == {"retention_days": None}
    assert entry.after == {"retention_days": 14}
    # null goes back to the platform default.
    assert client.patch("/api/v1/tenant/", {"retention_days": None}, format="json").json()["retention_days"] is None


def test_it_refuses_a_retention_outside_its_range(world):
    client = world.client(world.owner_key)
    for value in (0, 3651, "ten"):
        response = client.patch("/api/v1/tenant/", {"retention_days": value}, format="json")
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "validation_error"
        assert "retention_days" in response.json()["error"]["details"]
    world.tenant.refresh_from_db()
    assert world.tenant.retention_days is None
