"""The reply box of the web inbox, and the sent copy: threaded with the message it answers,
flagged ``is_sent`` in the API, found by ``in:sent``."""

from __future__ import annotations

from email import message_from_bytes
from typing import Any

from django.test import Client

from mailboxes import pipeline
from mailboxes.tests.helpers import message_deliver
from outbound.models import OutboundMessage
from outbound.sent import sent_copy_store

ORIGINAL = (
    b"From: Customer <customer@remote.example.org>\r\nTo: inbox@acme.example.test\r\n"
    b"Subject: Where is my order?\r\nMessage-ID: <q1@remote.example.org>\r\n"
    b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n\r\nIt has not arrived.\r\n"
)


def test_it_replies_from_the_inbox_and_files_the_sent_copy_in_the_thread(world: Any) -> None:
    original = message_deliver(world.mailbox, ORIGINAL)
    browser = Client()
    browser.force_login(world.owner)
    page = browser.get(f"/inbox/{world.tenant.slug}/m/{original.pk}/")
    assert page.status_code == 200 and b'name="text"' in page.content and b"Send reply" in page.content
    response = browser.post(f"/inbox/{world.tenant.slug}/m/{original.pk}/reply/", {"text": "It ships today."})
    assert response.status_code == 302
    outbound = OutboundMessage.objects.get()
    sent = message_from_bytes(bytes(outbound.content))
    assert (sent["From"], sent["To"], sent["Subject"]) == (
        "inbox@acme.example.test",
        "customer@remote.example.org",
        "Re: Where is my order?",
    )
    assert sent["In-Reply-To"] == "<q1@remote.example.org>" and sent["References"] == "<q1@remote.example.org>"
    assert list(outbound.recipients.values_list("address", "state")) == [("customer@remote.example.org", "queued")]

    copy = sent_copy_store(outbound.pk)
    assert copy is not None and sent_copy_store(outbound.pk) == copy  # once
    pipeline.message_parse(message_id=copy.pk)
    pipeline.message_index(message_id=copy.pk)
    copy.refresh_from_db()
    assert copy.is_sent and copy.thread_id == original.thread_id and copy.mailbox_id == world.mailbox.pk
    api = world.client(world.owner_key)
    found = api.get("/api/v1/messages/", {"q": "in:sent"}).json()["results"]
    assert [(m["id"], m["is_sent"]) for m in found] == [(str(copy.pk), True)]
    thread = api.get("/api/v1/messages/", {"q": f"thread:{original.thread_id}"}).json()["results"]
    assert {m["id"] for m in thread} == {str(original.pk), str(copy.pk)}
    assert api.get("/api/v1/messages/", {"q": "-in:sent"}).json()["results"][0]["is_sent"] is False


def test_it_offers_no_reply_box_without_messages_send(world: Any) -> None:
    original = message_deliver(world.mailbox, ORIGINAL)
    browser = Client()
    browser.force_login(world.member)  # members read and write mail, they do not send
    assert b"Send reply" not in browser.get(f"/inbox/{world.tenant.slug}/m/{original.pk}/").content
    response = browser.post(f"/inbox/{world.tenant.slug}/m/{original.pk}/reply/", {"text": "x"})
    assert response.status_code == 403
    assert not OutboundMessage.objects.exists()
