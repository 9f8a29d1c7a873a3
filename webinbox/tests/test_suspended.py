"""A suspended tenant is refused at every door, as its API is: console, inbox, downloads, temporary inboxes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from mailboxes.tests.helpers import message_deliver, simple_message
from tenants.models import ApiKey, Membership, Tenant

pytestmark = pytest.mark.django_db

SUSPENDED = "This tenant is suspended"


def _suspend(tenant: Any) -> None:
    Tenant.objects.filter(pk=tenant.pk).update(status=Tenant.Status.SUSPENDED, status_reason="unpaid invoices")


def _refused(response: Any) -> None:
    assert response.status_code == 403, (response.status_code, response.content[:300])
    html = response.content.decode()
    assert SUSPENDED in html and "mailplatform.css" in html
    assert "unpaid invoices" not in html  # the staff's reason is not the members' business


def test_it_refuses_the_api_of_a_suspended_tenant(world: Any) -> None:
    _suspend(world.tenant)
    response = Client().get("/api/v1/mailboxes/", headers={"authorization": f"Bearer {world.owner_key}"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "tenant_suspended"


def test_it_refuses_the_console_of_a_suspended_tenant(world: Any, signed_in: Any) -> None:
    owner = signed_in("owner")
    base = f"/console/{world.tenant.slug}/"
    _suspend(world.tenant)
    for page in ("", "keys/", "members/", "domains/", "mailboxes/", "webhooks/", "events/", "audit/"):
        _refused(owner.get(base + page))
    keys = ApiKey.objects.count()
    _refused(owner.post(base + "keys/", {"name": "late key", "permissions": ["messages:read"]}))
    _refused(owner.post(base + "members/", {"email": "new.admin@example.test", "role": "admin"}))
    assert ApiKey.objects.count() == keys
    assert not Membership.objects.filter(user__email="new.admin@example.test").exists()
    # Its only tenant: the console's start page leads to the same refusal.
    assert owner.get("/console/", follow=True).status_code == 403


def test_it_refuses_the_inbox_of_a_suspended_tenant(world: Any, signed_in: Any) -> None:
    message = message_deliver(world.mailbox, simple_message("Kept from view"))
    member = signed_in("member")
    base = f"/inbox/{world.tenant.slug}/"
    _suspend(world.tenant)
    for path in ("", "poll/", f"mailboxes/{world.mailbox.pk}/", f"m/{message.pk}/", f"m/{message.pk}/body/"):
        _refused(member.get(base + path))
    _refused(member.post(base + f"m/{message.pk}/", {"action": "delete"}))
    message.refresh_from_db()
    assert message.deleted_at is None
    start = member.get("/inbox/")
    assert start.status_code == 200
    html = start.content.decode()
    assert "Kept from view" not in html and world.mailbox.address not in html
    assert f"{world.tenant.name} is suspended" in html and "not a member of any tenant" not in html


def test_it_refuses_signed_downloads_of_a_suspended_tenant(world: Any, settings: Any, tmp_path: Path) -> None:
    from mailboxes import blobs

    settings.STORAGES = {
        **settings.STORAGES,
        "blobs": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(tmp_path)}},
    }
    key = f"raw/{world.tenant.pk}/2026/01/01/{'a' * 64}.eml"
    blobs.blob_put(key, b"Subject: raw\r\n\r\nbody\r\n")
    link = blobs.blob_signed_url(key, filename="m.eml", content_type="message/rfc822").split("testserver", 1)[1]
    assert Client().get(link).status_code == 200
    _suspend(world.tenant)
    answer = Client().get(link)
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "tenant_suspended"


def test_it_refuses_the_temporary_inboxes_of_a_suspended_tenant() -> None:
    from webinbox.services import temp_inbox_create

    temp, token = temp_inbox_create(ip="127.0.0.1")
    message = message_deliver(temp.mailbox, simple_message("Temp mail", to=temp.mailbox.address))
    client = Client()
    assert client.get(f"/t/{token}/").status_code == 200
    _suspend(temp.mailbox.tenant)
    for path in ("", "poll/", f"m/{message.pk}/", f"m/{message.pk}/body/"):
        answer = client.get(f"/t/{token}/{path}")
        _refused(answer)
        assert answer["Cache-Control"] == "no-store"
    _refused(client.post(f"/t/{token}/extend/"))
    _refused(client.post(f"/t/{token}/delete/"))
    temp.refresh_from_db()
    assert temp.extensions == 0


def test_it_creates_no_temporary_inbox_while_their_tenant_is_suspended() -> None:
    from webinbox.models import TempInbox
    from webinbox.services import temp_tenant_get_or_create

    tenant, _ = temp_tenant_get_or_create()
    _suspend(tenant)
    _refused(Client().post("/"))
    answer = Client().generic("POST", "/api/v1/temp-inboxes/")
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "tenant_suspended"
    assert not TempInbox.objects.exists()
