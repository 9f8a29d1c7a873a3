"""Our own sign-in and invitation mail never becomes readable mail when it comes back in.

The scenario: the owner's address is one of the tenant's own mailboxes. A viewer (or a key
scoped to that mailbox) asks for the owner's sign-in link from their own browser; the mail
goes out through EMAIL_URL and comes back through the front door (a real SMTP socket, the
same drainer as production). It must not be stored; an audit entry says it was dropped.
"""

from __future__ import annotations

import re
import smtplib
from typing import Any

import pytest
from django.core import mail
from django.test import Client

from audit.models import AuditEntry, Event
from ingest.platform_mail import HEADER, is_signin_mail, signin_mail_headers
from ingest.services import spool_drain
from mailboxes.models import Message
from tenants.access import Principal
from tenants.models import Membership
from webinbox.services import member_invite, outbound_flush

# Sign-in work runs on a background thread with its own connection: it must see committed rows.
pytestmark = pytest.mark.django_db(transaction=True)

LINK = re.compile(r"https?://\S+/login/link/(\S+)/")


def deliver(server: Any, raw: bytes, recipient: str) -> None:
    """``raw`` through the SMTP front door (a real socket), then the drainer."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        assert smtp.sendmail("noreply@mailplatform.example", [recipient], raw) == {}
    spool_drain(server.spool)


def test_it_drops_the_owners_sign_in_mail_that_lands_in_the_tenants_own_mailbox(
    world: Any, smtp_server: Any, settings: Any
) -> None:
    settings.BASE_URL = "https://mail.example.test"
    world.owner.email = world.mailbox.address  # the owner's mail is delivered into the platform
    world.owner.save()
    server = smtp_server()
    viewer_key = world.key(["messages:read"], mailboxes=[world.mailbox], name="scoped to the inbox")

    viewer_browser = Client()
    viewer_browser.force_login(world.viewer)
    assert viewer_browser.post("/login/", {"email": world.owner.email}).status_code == 200
    outbound_flush()
    [sent] = mail.outbox
    match = LINK.search(str(sent.body))
    assert match is not None
    token = match.group(1)
    deliver(server, sent.message().as_bytes(), world.mailbox.address)

    assert not Message.objects.filter(mailbox=world.mailbox).exists()
    api = Client(HTTP_AUTHORIZATION=f"Bearer {viewer_key}")
    listed = api.get("/api/v1/messages/", {"mailbox": str(world.mailbox.pk)})
    assert listed.status_code == 200 and listed.json()["results"] == []
    page = viewer_browser.get(f"/inbox/{world.tenant.slug}/mailboxes/{world.mailbox.pk}/")
    assert page.status_code == 200 and token not in page.content.decode()

    entry = AuditEntry.objects.get(action="message.dropped_login_mail")
    assert (entry.tenant_id, entry.resource_id) == (world.tenant.pk, str(world.mailbox.pk))
    event = Event.objects.get(type="message.dropped_login_mail")
    assert event.mailbox_id == world.mailbox.pk
    for record in (str(entry.__dict__), str(event.data)):
        assert token not in record and "/login/link/" not in record
    assert server.spool.pending() == []

    # Ordinary mail to the same mailbox, and a forged or stale marker, are still stored.
    deliver(server, b"From: a@example.org\r\nSubject: hello\r\n\r\nHello.\r\n", world.mailbox.address)
    forged = f"To: {world.mailbox.address}\r\n{HEADER}: v1; t=1700000000; s={'A' * 43}\r\n\r\nHi\r\n"
    deliver(server, forged.encode(), world.mailbox.address)
    assert Message.objects.filter(mailbox=world.mailbox).count() == 2


def test_it_invites_without_a_sign_in_link_and_marks_the_invitation(
    world: Any, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.BASE_URL = "https://mail.example.test"
    principal = Principal.for_member(Membership.objects.get(tenant=world.tenant, user=world.owner))
    with django_capture_on_commit_callbacks(execute=True):
        member_invite(principal=principal, email="new.admin@example.test", role=Membership.Role.ADMIN)
    outbound_flush()
    [sent] = mail.outbox
    assert "/login/link/" not in sent.body  # nothing in it signs anyone in
    assert "https://mail.example.test/login/" in sent.body
    assert is_signin_mail(sent.message().as_bytes())


def test_it_recognises_only_its_own_recent_signature_for_the_address_it_was_sent_to() -> None:
    def message(to: str, headers: dict[str, str]) -> bytes:
        lines = [f"To: {to}", *(f"{name}: {value}" for name, value in headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\nbody\r\n").encode()

    now = 1_800_000_000
    marked = signin_mail_headers("Owner@Acme.example.test", now=now)
    assert is_signin_mail(message("owner@acme.example.test", marked), now=now + 60)
    assert not is_signin_mail(message("someone.else@acme.example.test", marked), now=now + 60)  # replayed
    assert not is_signin_mail(message("owner@acme.example.test", marked), now=now + 8 * 86400)  # stale
    assert not is_signin_mail(message("owner@acme.example.test", {}), now=now)
