"""The console's Connectors page: add an account, test it against Dovecot, pause, delete;
members without connectors:manage and outsiders are refused; no secret on the page."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from ingest.models import Connector

pytestmark = pytest.mark.django_db


def _client(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_it_adds_tests_pauses_and_deletes_a_connector_from_the_console(world, dovecot, imap_account):
    owner = _client(world.owner)
    page = f"/console/{world.tenant.slug}/connectors/"
    assert owner.get(page).status_code == 200
    response = owner.post(
        page,
        {
            "mailbox": str(world.mailbox.pk),
            "host": "127.0.0.1",
            "port": dovecot.port,
            "tls_mode": "none",
            "auth_type": "password",
            "username": imap_account.username,
            "password": imap_account.password,
            "folders": "INBOX, Archive",
        },
    )
    assert response.status_code == 302, response.content
    connector = Connector.objects.get()
    assert connector.folders == ["INBOX", "Archive"]
    listing = owner.get(page).content.decode()
    assert imap_account.username in listing and imap_account.password not in listing
    tested = owner.post(f"{page}{connector.pk}/", {"action": "test"}, follow=True).content.decode()
    assert "signed in; folders: " in tested
    owner.post(f"{page}{connector.pk}/", {"action": "pause"})
    assert Connector.objects.get().state == Connector.State.DISABLED
    owner.post(f"{page}{connector.pk}/", {"action": "delete"})
    assert not Connector.objects.exists()


def test_it_refuses_members_without_the_permission_and_outsiders(world):
    from tenants.models import Membership
    from tenants.tests.factories import MembershipFactory

    page = f"/console/{world.tenant.slug}/connectors/"
    assert _client(world.member).get(page).status_code == 403
    outsider = MembershipFactory(tenant=world.outsider_tenant, role=Membership.Role.OWNER).user
    assert _client(outsider).get(page).status_code == 404
