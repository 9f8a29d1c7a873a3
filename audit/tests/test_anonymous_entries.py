"""Entries written on behalf of nobody in particular (a refused sign-in) are marked and bounded."""

from __future__ import annotations

import csv
import io
import json

import pytest

from audit import context
from audit.models import AuditEntry
from audit.services import ANONYMOUS_USER_AGENT_MAX, Actor, audit_entry_record
from tenants.tests.test_sso import enterprise_provider, sign_in

HOSTILE_AGENT = '=HYPERLINK("http://evil.example/","click")\r\n' + "A" * 5000


def _forget_nonce(test_client):
    session = test_client.session
    for flow in session["sso_flows"].values():
        flow["nonce"] = "not-the-nonce-that-was-sent"
    session.save()


def _failed(tenant):
    return AuditEntry.objects.filter(tenant=tenant, action="auth.login_failed")


def test_it_marks_a_failed_sso_callback_anonymous_and_cuts_its_user_agent(client, world, oidc_provider):
    enterprise_provider(world, oidc_provider)
    client.defaults["HTTP_USER_AGENT"] = HOSTILE_AGENT
    assert sign_in(client, "alice@corp.example.test", tamper=_forget_nonce).status_code == 403
    entry = _failed(world.tenant).get()
    assert entry.anonymous is True
    assert len(entry.user_agent) <= ANONYMOUS_USER_AGENT_MAX
    assert "\r" not in entry.user_agent and "\n" not in entry.user_agent
    # The API and the export say so.
    api = world.client(world.owner_key)
    row = next(r for r in api.get("/api/v1/audit/?action=auth.login_failed").json()["results"])
    assert row["anonymous"] is True
    exported = api.get("/api/v1/audit/export/?format=json&action=auth.login_failed")
    assert [r["anonymous"] for r in json.loads(b"".join(exported.streaming_content))] == [True]


def test_it_bounds_anonymous_entries_per_address_and_window(world, settings):
    settings.AUDIT_ANONYMOUS_PER_IP = 3
    settings.AUDIT_ANONYMOUS_WINDOW = 600
    anonymous = Actor(type="user", label="eve@elsewhere.example.test")
    for ip in ("192.0.2.7", "192.0.2.7", "192.0.2.7", "192.0.2.7", "192.0.2.7", "198.51.100.1"):
        with context.bind(ip=ip, user_agent="flood/1"):
            audit_entry_record(tenant_id=world.tenant.pk, actor=anonymous, action="auth.login_failed")
    assert _failed(world.tenant).filter(ip="192.0.2.7").count() == 3
    assert _failed(world.tenant).filter(ip="198.51.100.1").count() == 1
    # Another tenant's trail has its own quota; signed-in actors are never bounded.
    with context.bind(ip="192.0.2.7"):
        assert audit_entry_record(tenant_id=world.outsider_tenant.pk, actor=anonymous, action="auth.login_failed")
        member = Actor(type="user", label=world.owner.email, user_id=world.owner.pk)
        for _ in range(5):
            entry = audit_entry_record(tenant_id=world.tenant.pk, actor=member, action="tenant.update")
            assert entry is not None
            assert entry.anonymous is False


def test_it_opens_a_new_window_for_an_address_once_the_old_one_passed(world, settings):
    settings.AUDIT_ANONYMOUS_PER_IP = 1
    anonymous = Actor(type="user", label="anonymous")
    with context.bind(ip="192.0.2.8"):
        assert audit_entry_record(tenant_id=world.tenant.pk, actor=anonymous, action="auth.login_failed")
        assert audit_entry_record(tenant_id=world.tenant.pk, actor=anonymous, action="auth.login_failed") is None
        AuditEntry.objects.filter(ip="192.0.2.8").update(created_at="2000-01-01T00:00:00Z")
        assert audit_entry_record(tenant_id=world.tenant.pk, actor=anonymous, action="auth.login_failed")


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_it_escapes_formula_cells_in_the_csv_export(world, start):
    with context.bind(ip="192.0.2.9", user_agent=f"{start}cmd|' /C calc'!A0"):
        audit_entry_record(
            tenant_id=world.tenant.pk,
            actor=Actor(type="user", label=f"{start}1+1@x.test", user_id=world.owner.pk),
            action="tenant.update",
            after={"name": "x"},
        )
    response = world.client(world.owner_key).get("/api/v1/audit/export/?format=csv&action=tenant.update")
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    row = next(r for r in rows if r["ip"] == "192.0.2.9")
    assert row["user_agent"] == f"'{start}cmd|' /C calc'!A0"
    assert row["actor"] == f"'{start}1+1@x.test"
    assert row["after"] == '{"name": "x"}'
    for cell in (value for row in rows for value in row.values()):
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
