"""The staff admin: every page renders, search and actions work, staff writes are audited,
the log is append-only and no secret hash ever reaches a page."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib import admin
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from audit.models import AuditEntry, Event
from audit.services import event_record
from tenants.models import ApiKey, Domain, Membership, Tenant, User
from webinbox.models import LoginToken
from webinbox.services import login_link_create


@pytest.fixture
def staff(db: Any) -> User:
    return User.objects.create_superuser(email="staff@example.test", password="a long staff passphrase")


@pytest.fixture
def staff_client(staff: User) -> Client:
    client = Client()
    client.force_login(staff)
    return client


@pytest.fixture
def populated(world: Any) -> Any:
    """The shared world plus one of every other object the admin lists."""
    from mailboxes.models import Attachment, Message
    from tenants.models import SsoDomain, SsoProvider
    from webinbox.models import SessionGeneration, TempInbox

    login_link_create(user=world.owner)
    event_record(tenant_id=world.tenant.pk, type="mailbox.created", mailbox_id=world.mailbox.pk)
    message = Message.objects.create(
        tenant=world.tenant,
        mailbox=world.mailbox,
        rcpt=world.mailbox.address,
        mail_from="sender@example.test",
        subject="Your code",
        text="BODY-NEVER-IN-ADMIN 123456",
        size=120,
        sha256="e" * 64,
        storage_key=f"raw/{world.tenant.pk}/x.eml",
        trace_id="Q1234567",
        received_at=timezone.now(),
    )
    Attachment.objects.create(
        tenant=world.tenant, message=message, filename="a.pdf", size=3, sha256="f" * 64, storage_key="att/x"
    )
    TempInbox.objects.create(mailbox=world.sibling, token_hash="7" * 64, created_ip="127.0.0.1")
    provider = SsoProvider.objects.create(
        tenant=world.tenant,
        issuer="https://idp.example.test",
        client_id="client",
        client_secret_encrypted="gAAAAA-ENCRYPTED-CLIENT-SECRET",
    )
    SsoDomain.objects.create(name="acme-people.example.test", provider=provider)
    SessionGeneration.objects.create(user=world.owner, generation=1)
    return world


def _url(model: type, view: str, *args: Any) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def _staff_entries(action: str) -> list[AuditEntry]:
    return list(AuditEntry.objects.filter(action=action, actor_type=AuditEntry.ActorType.STAFF))


def test_it_renders_every_changelist_and_change_page(staff_client: Client, populated: Any) -> None:
    assert len(admin.site._registry) >= 14
    for model, model_admin in admin.site._registry.items():
        response = staff_client.get(_url(model, "changelist"))
        assert response.status_code == 200, (model, response.status_code)
        obj = model._default_manager.first()
        if obj is not None:
            response = staff_client.get(_url(model, "change", obj.pk))
            assert response.status_code == 200, (model, response.status_code)
        if model_admin.has_add_permission(response.wsgi_request):
            response = staff_client.get(_url(model, "add"))
            assert response.status_code == 200, (model, response.status_code)


def test_it_searches_tenants_domains_mailboxes_and_keys(staff_client: Client, populated: Any) -> None:
    response = staff_client.get(_url(Tenant, "changelist"), {"q": "outsider"})
    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == [populated.outsider_tenant]

    response = staff_client.get(_url(Domain, "changelist"), {"q": "acme"})
    assert [domain.name for domain in response.context["cl"].result_list] == ["acme.example.test"]

    from mailboxes.models import Mailbox

    response = staff_client.get(_url(Mailbox, "changelist"), {"q": "sibling"})
    assert [box.address for box in response.context["cl"].result_list] == ["sibling@acme.example.test"]

    response = staff_client.get(_url(ApiKey, "changelist"), {"q": populated.owner_key[-4:]})
    assert [key.name for key in response.context["cl"].result_list] == ["owner key"]

    response = staff_client.get(_url(User, "changelist"), {"q": populated.viewer.email})
    assert list(response.context["cl"].result_list) == [populated.viewer]


def test_it_filters_keys_by_state(staff_client: Client, populated: Any) -> None:
    key = ApiKey.objects.get(name="owner key")
    key.revoked_at = timezone.now()
    key.save(update_fields=["revoked_at"])
    response = staff_client.get(_url(ApiKey, "changelist"), {"state": "revoked"})
    assert [row.name for row in response.context["cl"].result_list] == ["owner key"]
    response = staff_client.get(_url(ApiKey, "changelist"), {"state": "active"})
    assert [row.name for row in response.context["cl"].result_list] == ["outsider key"]


def test_it_suspends_and_reactivates_tenants_through_the_service(
    staff_client: Client, staff: User, populated: Any
) -> None:
    tenant = populated.tenant
    response = staff_client.post(
        _url(Tenant, "changelist"), {"action": "suspend_tenants", "_selected_action": [str(tenant.pk)]}, follow=True
    )
    assert response.status_code == 200
    tenant.refresh_from_db()
    assert tenant.status == Tenant.Status.SUSPENDED
    assert "staff@example.test" in tenant.status_reason
    populated.outsider_tenant.refresh_from_db()
    assert populated.outsider_tenant.status == Tenant.Status.ACTIVE
    [entry] = _staff_entries("tenant.suspend")
    assert entry.tenant_id == tenant.pk
    assert entry.actor_label == "staff@example.test"
    assert entry.actor_user_id == staff.pk
    assert entry.ip == "127.0.0.1"
    assert entry.before == {"status": "active", "status_reason": ""}

    # A suspended tenant's key no longer works.
    assert populated.client(populated.owner_key).get("/api/v1/mailboxes/").status_code in {401, 403}

    staff_client.post(_url(Tenant, "changelist"), {"action": "reactivate_tenants", "_selected_action": [tenant.pk]})
    tenant.refresh_from_db()
    assert tenant.status == Tenant.Status.ACTIVE
    assert tenant.status_reason == ""
    assert len(_staff_entries("tenant.activate")) == 1


def test_it_revokes_keys_through_the_service(staff_client: Client, populated: Any) -> None:
    key = ApiKey.objects.get(name="owner key")
    assert populated.client(populated.owner_key).get("/api/v1/mailboxes/").status_code == 200
    response = staff_client.post(
        _url(ApiKey, "changelist"), {"action": "revoke_keys", "_selected_action": [str(key.pk)]}, follow=True
    )
    assert response.status_code == 200
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert ApiKey.objects.get(name="outsider key").revoked_at is None
    [entry] = _staff_entries("api_key.revoke")
    assert entry.resource_id == str(key.pk)
    assert populated.client(populated.owner_key).get("/api/v1/mailboxes/").status_code == 401


def test_it_audits_staff_edits_with_before_and_after(staff_client: Client, populated: Any) -> None:
    membership = Membership.objects.get(user=populated.member)
    response = staff_client.post(
        _url(Membership, "change", membership.pk),
        {"user": populated.member.pk, "tenant": populated.tenant.pk, "role": "admin"},
    )
    assert response.status_code == 302, response.content
    membership.refresh_from_db()
    assert membership.role == "admin"
    [entry] = _staff_entries("membership.update")
    assert entry.before == {"role": "member"}
    assert entry.after == {"role": "admin"}
    assert entry.tenant_id == populated.tenant.pk

    mailbox = populated.mailbox
    response = staff_client.post(_url(type(mailbox), "change", mailbox.pk), {"name": "Renamed", "retention_days": "7"})
    assert response.status_code == 302, response.content
    mailbox.refresh_from_db()
    assert (mailbox.name, mailbox.retention_days, mailbox.address) == ("Renamed", 7, "inbox@acme.example.test")
    [entry] = _staff_entries("mailbox.update")
    assert entry.after == {"name": "Renamed", "retention_days": 7}


def test_it_audits_staff_creates_and_deletes(staff_client: Client, populated: Any) -> None:
    response = staff_client.post(
        _url(Domain, "add"),
        {"tenant": populated.tenant.pk, "name": " New.Example.TEST. ", "recipient_policy": "reject"},
    )
    assert response.status_code == 302, response.content
    domain = Domain.objects.get(name="new.example.test")
    assert domain.state == Domain.State.PENDING
    [created] = _staff_entries("domain.create")
    assert created.after is not None
    assert created.after["name"] == "new.example.test"

    response = staff_client.post(_url(Domain, "delete", domain.pk), {"post": "yes"})
    assert response.status_code == 302
    assert not Domain.objects.filter(pk=domain.pk).exists()
    [deleted] = _staff_entries("domain.delete")
    assert deleted.resource_id == str(domain.pk)

    tokens = list(LoginToken.objects.all())
    response = staff_client.post(
        _url(LoginToken, "changelist"),
        {"action": "delete_selected", "_selected_action": [str(token.pk) for token in tokens], "post": "yes"},
    )
    assert response.status_code == 302
    assert not LoginToken.objects.exists()
    entries = _staff_entries("login_token.delete")
    assert len(entries) == len(tokens)
    assert all("token_hash" not in (entry.before or {}) for entry in entries)


def test_it_creates_users_by_email_without_recording_the_password(staff_client: Client, db: Any) -> None:
    response = staff_client.post(
        _url(User, "add"),
        {
            "email": "New.Person@Example.TEST",
            "usable_password": "true",
            "password1": "correct horse battery staple 42",
            "password2": "correct horse battery staple 42",
        },
    )
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else response
    user = User.objects.get(email="new.person@example.test")
    assert user.check_password("correct horse battery staple 42")
    [entry] = _staff_entries("user.create")
    assert entry.after is not None
    assert "password" not in entry.after
    assert user.password not in str(entry.after)

    duplicate = staff_client.post(_url(User, "add"), {"email": "NEW.person@example.test", "usable_password": "false"})
    assert duplicate.status_code == 200
    assert User.objects.filter(email__iexact="new.person@example.test").count() == 1

    response = staff_client.post(
        reverse("admin:auth_user_password_change", args=[user.pk]),
        {"usable_password": "true", "password1": "another long passphrase 7", "password2": "another long passphrase 7"},
    )
    assert response.status_code == 302
    assert len(_staff_entries("user.password_change")) == 1


def test_it_keeps_events_and_audit_entries_append_only(staff_client: Client, populated: Any) -> None:
    for model in (Event, AuditEntry):
        obj = model._default_manager.first()
        assert obj is not None
        assert staff_client.get(_url(model, "add")).status_code == 403
        assert staff_client.post(_url(model, "delete", obj.pk), {"post": "yes"}).status_code == 403
        count = model._default_manager.count()
        staff_client.post(
            _url(model, "changelist"), {"action": "delete_selected", "_selected_action": [obj.pk], "post": "yes"}
        )
        assert model._default_manager.count() == count
        page = staff_client.get(_url(model, "change", obj.pk))
        assert page.status_code == 200
        assert b'name="_save"' not in page.content
    entry = AuditEntry.objects.first()
    assert entry is not None
    before = entry.action
    staff_client.post(_url(AuditEntry, "change", entry.pk), {"action": "forged"})
    entry.refresh_from_db()
    assert entry.action == before


def test_it_never_shows_a_key_hash_or_login_token_hash(staff_client: Client, populated: Any) -> None:
    from tenants.models import SsoProvider
    from webinbox.models import TempInbox

    hashes = [key.secret_hash for key in ApiKey.objects.all()] + [t.token_hash for t in LoginToken.objects.all()]
    hashes += [inbox.token_hash for inbox in TempInbox.objects.all()]
    hashes += [provider.client_secret_encrypted for provider in SsoProvider.objects.all()]
    secrets = [populated.owner_key, populated.outsider_key, "BODY-NEVER-IN-ADMIN"]
    assert len(hashes) >= 5
    pages = []
    for model in admin.site._registry:
        pages.append(_url(model, "changelist"))
        pages.extend(_url(model, "change", obj.pk) for obj in model._default_manager.all()[:5])
    pages.append(reverse("admin:index"))
    for page in pages:
        html = staff_client.get(page).content.decode()
        for value in [*hashes, *secrets]:
            assert value not in html, page


def test_it_refuses_the_admin_to_non_staff(populated: Any) -> None:
    client = Client()
    client.force_login(populated.owner)
    response = client.get(_url(Tenant, "changelist"))
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_it_lists_expired_and_used_login_links_separately(staff_client: Client, populated: Any) -> None:
    LoginToken.objects.create(
        user=populated.member, token_hash="0" * 64, expires_at=timezone.now() - timedelta(minutes=1)
    )
    response = staff_client.get(_url(LoginToken, "changelist"), {"state": "expired"})
    assert [token.user for token in response.context["cl"].result_list] == [populated.member]
    response = staff_client.get(_url(LoginToken, "changelist"), {"state": "unused"})
    assert [token.user for token in response.context["cl"].result_list] == [populated.owner]
