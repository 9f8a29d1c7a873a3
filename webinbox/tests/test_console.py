"""The tenant console: outsiders 404, role rules, CSRF, audited writes through services."""

from __future__ import annotations

from typing import Any

import pytest
from django.core import mail
from django.test import Client

from audit.models import AuditEntry
from tenants.models import ApiKey, Domain, Membership
from webinbox.services import outbound_flush

pytestmark = pytest.mark.django_db

PAGES = ["", "domains/", "mailboxes/", "members/", "keys/", "webhooks/", "events/", "audit/"]


def _base(world: Any) -> str:
    return f"/console/{world.tenant.slug}/"


@pytest.mark.parametrize("page", PAGES)
def test_it_answers_404_to_an_outsider_on_every_page(world: Any, signed_in: Any, page: str) -> None:
    outsider = signed_in("outsider")
    assert outsider.get(_base(world) + page).status_code == 404
    assert outsider.post(_base(world) + page, {"name": "x.example.test"}).status_code == 404


def test_it_answers_404_for_another_tenants_objects_inside_ones_own_console(world: Any, signed_in: Any) -> None:
    owner = signed_in("owner")
    base = _base(world)
    assert owner.get(f"{base}domains/{world.outsider_domain.pk}/").status_code == 404
    assert owner.post(f"{base}mailboxes/{world.outsider_mailbox.pk}/", {"action": "delete"}).status_code == 404
    outsider_key = ApiKey.objects.get(tenant=world.outsider_tenant)
    assert owner.post(f"{base}keys/{outsider_key.pk}/revoke/").status_code == 404
    assert owner.get(f"{base}domains/not-a-uuid/").status_code == 404
    outsider_key.refresh_from_db()
    assert outsider_key.revoked_at is None


@pytest.mark.parametrize(
    ("who", "page", "status"),
    [
        ("viewer", "", 200),
        ("viewer", "domains/", 200),
        ("viewer", "mailboxes/", 200),
        ("viewer", "members/", 200),
        ("viewer", "events/", 200),
        ("viewer", "keys/", 403),
        ("viewer", "webhooks/", 403),
        ("viewer", "audit/", 403),
        ("member", "keys/", 403),
        ("member", "audit/", 403),
        ("owner", "keys/", 200),
        ("owner", "webhooks/", 200),
        ("owner", "audit/", 200),
    ],
)
def test_it_shows_pages_by_role(world: Any, signed_in: Any, who: str, page: str, status: int) -> None:
    assert signed_in(who).get(_base(world) + page).status_code == status


def test_it_refuses_writes_to_roles_without_the_permission(world: Any, signed_in: Any) -> None:
    base = _base(world)
    viewer, member = signed_in("viewer"), signed_in("member")
    assert viewer.post(f"{base}domains/", {"name": "new.example.test", "recipient_policy": "reject"}).status_code == 403
    assert member.post(f"{base}domains/", {"name": "new.example.test", "recipient_policy": "reject"}).status_code == 403
    assert viewer.post(f"{base}mailboxes/", {"domain": world.domain.pk, "local_part": "x"}).status_code == 403
    assert member.post(f"{base}members/", {"email": "new@example.test", "role": "owner"}).status_code == 403
    assert member.post(base, {"name": "Hijacked", "ip_allowlist": ""}).status_code == 403
    assert member.post(f"{base}keys/", {"name": "k", "permissions": ["messages:read"]}).status_code == 403
    assert not Domain.objects.filter(name="new.example.test").exists()
    world.tenant.refresh_from_db()
    assert world.tenant.name == "Acme"


def test_it_lets_a_member_manage_mailboxes(world: Any, signed_in: Any) -> None:
    member = signed_in("member")
    response = member.post(f"{_base(world)}mailboxes/", {"domain": world.domain.pk, "local_part": "Sales"})
    assert response.status_code == 302
    created = world.domain.mailboxes.get(local_part="sales")
    assert AuditEntry.objects.filter(action="mailbox.create", resource_id=str(created.pk)).exists()
    member.post(f"{_base(world)}mailboxes/{created.pk}/", {"retention_days": "30"})
    created.refresh_from_db()
    assert created.retention_days == 30
    member.post(f"{_base(world)}mailboxes/{created.pk}/", {"action": "delete"})
    assert not world.domain.mailboxes.filter(pk=created.pk).exists()


def test_it_mints_a_scoped_key_shown_once_that_works_against_the_api(world: Any, signed_in: Any) -> None:
    owner = signed_in("owner")
    response = owner.post(
        f"{_base(world)}keys/",
        {"name": "ci", "permissions": ["messages:read"], "mailboxes": [str(world.mailbox.pk)]},
    )
    assert response.status_code == 200
    secret = response.context["minted"]["secret"]
    assert secret.startswith("mp_") and secret in response.content.decode()
    assert response["Cache-Control"] == "no-store"
    key = ApiKey.objects.get(name="ci")
    assert list(key.allowed_mailboxes.all()) == [world.mailbox]
    assert secret not in owner.get(f"{_base(world)}keys/").content.decode()
    api = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert api.get("/api/v1/messages/", {"mailbox": world.mailbox.pk}).status_code == 200
    assert api.get(f"/api/v1/mailboxes/{world.sibling.pk}/").status_code == 404
    assert AuditEntry.objects.filter(action="api_key.create", resource_id=str(key.pk), actor_user=world.owner).exists()
    assert owner.post(f"{_base(world)}keys/{key.pk}/revoke/").status_code == 302
    assert api.get("/api/v1/messages/").status_code == 401


def test_it_refuses_tenant_wide_permissions_on_a_scoped_key(world: Any, signed_in: Any) -> None:
    response = signed_in("owner").post(
        f"{_base(world)}keys/", {"name": "bad", "permissions": ["keys:manage"], "domains": [str(world.domain.pk)]}
    )
    assert response.status_code == 200
    assert not ApiKey.objects.filter(name="bad").exists()


def test_it_invites_a_member(world: Any, signed_in: Any) -> None:
    owner = signed_in("owner")
    with pytest.MonkeyPatch.context():
        response = owner.post(f"{_base(world)}members/", {"email": "New.Person@Example.test", "role": "viewer"})
    assert response.status_code == 302
    membership = Membership.objects.get(tenant=world.tenant, user__email="new.person@example.test")
    assert membership.role == "viewer"
    assert AuditEntry.objects.filter(action="membership.create", resource_id=str(membership.pk)).exists()


def test_it_sends_the_invitation_mail_after_commit(
    world: Any, signed_in: Any, django_capture_on_commit_callbacks: Any
) -> None:
    owner = signed_in("owner")
    with django_capture_on_commit_callbacks(execute=True):
        owner.post(f"{_base(world)}members/", {"email": "invitee@example.test", "role": "member"})
    outbound_flush()
    assert [message.to for message in mail.outbox] == [["invitee@example.test"]]
    assert "http://testserver/login/" in mail.outbox[0].body
    assert "/login/link/" not in mail.outbox[0].body  # the invitee asks for a link bound to their browser


def test_it_never_removes_the_last_owner(world: Any, signed_in: Any) -> None:
    owner = signed_in("owner")
    membership = Membership.objects.get(tenant=world.tenant, user=world.owner)
    owner.post(f"{_base(world)}members/{membership.pk}/", {"action": "remove"})
    owner.post(f"{_base(world)}members/{membership.pk}/", {"role": "viewer"})
    membership.refresh_from_db()
    assert membership.role == "owner"
    member = Membership.objects.get(tenant=world.tenant, user=world.member)
    owner.post(f"{_base(world)}members/{member.pk}/", {"action": "remove"})
    assert not Membership.objects.filter(pk=member.pk).exists()
    assert AuditEntry.objects.filter(action="membership.delete", resource_id=str(member.pk)).exists()


def test_it_adds_a_domain_shows_its_records_and_verifies_it(world: Any, signed_in: Any, dns_zone: Any) -> None:
    owner = signed_in("owner")
    response = owner.post(f"{_base(world)}domains/", {"name": "Mail.Example.TEST", "recipient_policy": "reject"})
    domain = Domain.objects.get(name="mail.example.test")
    assert response["Location"].endswith(f"/domains/{domain.pk}/")
    page = owner.get(response["Location"]).content.decode()
    assert domain.verification_record in page and "mx1.mailplatform.test" in page
    dns_zone.set(domain.name, "TXT", [domain.verification_record])
    dns_zone.set(domain.name, "MX", [(10, "mx1.mailplatform.test")])
    owner.post(response["Location"], {"action": "verify"})
    domain.refresh_from_db()
    assert domain.state == "verified"
    assert AuditEntry.objects.filter(action="domain.verify", resource_id=str(domain.pk)).exists()


def test_it_guards_the_console_with_the_tenants_ip_allowlist(world: Any, signed_in: Any) -> None:
    owner = signed_in("owner")
    # Refused: it would lock the owner (127.0.0.1) out.
    owner.post(_base(world), {"name": "Acme", "ip_allowlist": "192.0.2.0/24"})
    world.tenant.refresh_from_db()
    assert world.tenant.ip_allowlist == []
    owner.post(_base(world), {"name": "Acme", "ip_allowlist": "127.0.0.1\n192.0.2.0/24"})
    world.tenant.refresh_from_db()
    assert world.tenant.ip_allowlist == ["127.0.0.1/32", "192.0.2.0/24"]
    assert owner.get(_base(world)).status_code == 200
    elsewhere = Client(REMOTE_ADDR="198.51.100.4")
    elsewhere.force_login(world.owner)
    assert elsewhere.get(_base(world) + "domains/").status_code == 403
    # The inbox shows none of the tenant's mailboxes there, and says why.
    inbox = elsewhere.get("/inbox/").content.decode()
    assert world.mailbox.address not in inbox and "IP allowlist blocks your address (198.51.100.4)" in inbox
    assert AuditEntry.objects.filter(action="tenant.update", tenant=world.tenant).count() == 1


def test_it_manages_webhooks_rotation_and_replay(world: Any, signed_in: Any) -> None:
    from audit.services import event_record
    from webhooks.models import Endpoint

    owner = signed_in("owner")
    response = owner.post(
        f"{_base(world)}webhooks/", {"url": "http://127.0.0.1:9/hook", "event_types": "ingest.received, message.*"}
    )
    assert response.status_code == 200, response.content
    assert response.context["secret"].startswith("whsec_")
    endpoint = Endpoint.objects.get(tenant=world.tenant)
    assert endpoint.event_types == ["ingest.received", "message.*"]
    detail = f"{_base(world)}webhooks/{endpoint.pk}/"
    rotated = owner.post(detail, {"action": "rotate"})
    assert rotated.context["secret"].startswith("whsec_")
    first = event_record(tenant_id=world.tenant.pk, type="ingest.received", mailbox_id=world.mailbox.pk)
    event_record(tenant_id=world.tenant.pk, type="ingest.received", mailbox_id=world.mailbox.pk)
    owner.post(detail, {"action": "replay", "after": first.public_id})
    page = owner.get(detail).content.decode()
    assert "ingest.received" in page
    owner.post(detail, {"action": "disable"})
    endpoint.refresh_from_db()
    assert not endpoint.enabled
    actions = set(AuditEntry.objects.filter(resource_type="webhook").values_list("action", flat=True))
    assert {"webhook.create", "webhook.rotate_secret", "webhook.update"} <= actions


def test_it_filters_the_event_log_and_audit_trail(world: Any, signed_in: Any) -> None:
    from audit.services import event_record

    event_record(tenant_id=world.tenant.pk, type="mailbox.created", mailbox_id=world.mailbox.pk)
    event_record(tenant_id=world.tenant.pk, type="domain.verified", domain_id=world.domain.pk)
    event_record(tenant_id=world.outsider_tenant.pk, type="mailbox.created", mailbox_id=world.outsider_mailbox.pk)
    owner = signed_in("owner")
    events = owner.get(f"{_base(world)}events/", {"type": "mailbox.*", "mailbox": "junk"}).context["events"]
    assert [event.type for event in events] == ["mailbox.created"]
    audit = owner.get(f"{_base(world)}audit/", {"action": "api_key.*"})
    assert audit.status_code == 200
    assert owner.get(f"{_base(world)}events/", {"before": "x"}).status_code == 200


@pytest.mark.parametrize(
    ("path", "data"),
    [
        ("", {"name": "x"}),
        ("domains/", {"name": "csrf.example.test", "recipient_policy": "reject"}),
        ("mailboxes/", {"local_part": "csrf"}),
        ("members/", {"email": "csrf@example.test", "role": "member"}),
        ("keys/", {"name": "csrf", "permissions": ["messages:read"]}),
        ("webhooks/", {"url": "http://127.0.0.1:9/"}),
    ],
)
def test_it_rejects_console_writes_without_the_csrf_token(world: Any, signed_in: Any, path: str, data: Any) -> None:
    client = signed_in("owner", csrf=True)
    assert client.post(_base(world) + path, data).status_code == 403
    assert not ApiKey.objects.filter(name="csrf").exists()
    assert not Domain.objects.filter(name="csrf.example.test").exists()


def test_it_redirects_a_single_tenant_member_to_their_console(world: Any, signed_in: Any) -> None:
    response = signed_in("viewer").get("/console/")
    assert response.status_code == 302 and response["Location"] == _base(world)


def test_it_exports_the_filtered_audit_trail_to_admins_only(world: Any, signed_in: Any) -> None:
    import csv
    import io
    import json

    from tenants.access import Principal
    from tenants.services import domain_create

    domain_create(principal=Principal.system(world.tenant), name="exported.example.test")
    owner = signed_in("owner")
    exported = owner.get(f"{_base(world)}audit/export/", {"format": "csv", "action": "domain.*"})
    assert exported.status_code == 200
    assert exported["Content-Disposition"] == 'attachment; filename="audit.csv"'
    rows = list(csv.DictReader(io.StringIO(b"".join(exported.streaming_content).decode())))
    assert [row["action"] for row in rows] == ["domain.create"]
    as_json = owner.get(f"{_base(world)}audit/export/", {"format": "json"})
    assert "domain.create" in {row["action"] for row in json.loads(b"".join(as_json.streaming_content))}
    assert signed_in("member").get(f"{_base(world)}audit/export/").status_code == 403
    assert signed_in("outsider").get(f"{_base(world)}audit/export/").status_code == 404
