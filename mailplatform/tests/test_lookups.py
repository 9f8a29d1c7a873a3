"""rows_with_parent gives what the ORM's select_related lookup gives, field for field."""

from __future__ import annotations

from datetime import timedelta

from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from mailplatform.lookups import rows_with_parent
from tenants import keys
from tenants.access import ALL_PERMISSIONS, Principal
from tenants.models import ApiKey, Tenant
from tenants.services import api_key_mint


def _values(instance):
    return {field.attname: getattr(instance, field.attname) for field in type(instance)._meta.concrete_fields}


def test_it_loads_the_rows_and_their_parent_as_the_orm_does(world):
    principal = Principal.system(world.tenant)
    minted, secret = api_key_mint(principal=principal, name="child", permissions=ALL_PERMISSIONS)
    ApiKey.objects.filter(pk=minted.pk).update(
        expires_at=timezone.now() + timedelta(days=3), known_ips=["192.0.2.1"], revoked_at=timezone.now()
    )
    Tenant.objects.filter(pk=world.tenant.pk).update(name="Renamed")
    prefix = keys.lookup_prefix(secret)
    expected = list(ApiKey.objects.select_related("tenant").filter(prefix=prefix).order_by())
    with CaptureQueriesContext(connection) as queries:
        found = rows_with_parent(ApiKey, "tenant", "prefix", prefix)
        again = rows_with_parent(ApiKey, "tenant", "prefix", prefix)
    assert len(queries.captured_queries) == 2  # one statement a call, the tenant joined
    assert [_values(row) for row in found] == [_values(row) for row in expected] == [_values(row) for row in again]
    assert [_values(row.tenant) for row in found] == [_values(row.tenant) for row in expected]
    assert found[0].tenant.name == "Renamed" and found[0].known_ips == ["192.0.2.1"]
    assert not found[0]._state.adding and found[0]._state.db == "default"
    assert rows_with_parent(ApiKey, "tenant", "prefix", "no-such-prefix") == []
