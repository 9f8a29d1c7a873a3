"""App passwords: made by a member in the console, one mailbox each, revocable."""

from __future__ import annotations

import imaplib
import re
from typing import Any

import pytest
from django.test import Client

from audit.models import AuditEntry
from mailaccess.models import AppPassword
from mailaccess.server import ServerThread
from mailboxes.tests.helpers import message_deliver, simple_message

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_lets_a_member_make_an_app_password_that_opens_only_its_mailbox(
    imap_server: ServerThread, world: Any
) -> None:
    message_deliver(world.mailbox, simple_message("For Thunderbird"))
    member = Client()
    member.force_login(world.member)
    page = f"/console/{world.tenant.slug}/app-passwords/"
    answer = member.post(page, {"name": "Thunderbird", "mailbox": str(world.mailbox.pk), "can_write": "on"})
    assert answer.status_code == 200 and answer["Cache-Control"] == "no-store"
    secret = re.search(r'id="new-app-password">(mpa_[^<]+)<', answer.content.decode()).group(1)  # type: ignore[union-attr]
    stored = AppPassword.objects.get()
    assert stored.secret_hash != secret and secret not in str(stored.__dict__)
    client = imaplib.IMAP4("127.0.0.1", imap_server.port, timeout=10)
    client.login(world.mailbox.address, secret)
    assert client.list()[1] == [b'(\\HasNoChildren) "/" "INBOX"']
    assert client.select("INBOX")[1] == [b"1"]
    client.logout()
    with pytest.raises(imaplib.IMAP4.error):  # another mailbox's address: refused
        imaplib.IMAP4("127.0.0.1", imap_server.port, timeout=10).login(world.sibling.address, secret)
    outsider = Client()
    from tenants.models import Membership
    from tenants.tests.factories import MembershipFactory

    outsider.force_login(MembershipFactory(tenant=world.outsider_tenant, role=Membership.Role.OWNER).user)
    assert outsider.post(page + f"{stored.pk}/revoke/").status_code == 404
    assert member.post(page + f"{stored.pk}/revoke/").status_code == 302
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imaplib.IMAP4("127.0.0.1", imap_server.port, timeout=10).login(world.mailbox.address, secret)
    actions = set(AuditEntry.objects.filter(tenant=world.tenant).values_list("action", flat=True))
    assert {"app_password.create", "app_password.revoke", "mailaccess.login_failed"} <= actions
    reasons = {entry.after["reason"] for entry in AuditEntry.objects.filter(action="mailaccess.login_failed")}
    assert "app_password_revoked" in reasons
