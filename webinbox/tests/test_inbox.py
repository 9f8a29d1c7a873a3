"""The signed-in inbox and message view: scoping, roles, hostile HTML, live updates, downloads."""

from __future__ import annotations

import hashlib
import re
from html import unescape
from typing import Any

import pytest
import requests
from django.test import Client
from django.utils import timezone

from mailboxes.tests.helpers import fixture_bytes, message_deliver, simple_message

pytestmark = pytest.mark.django_db


def _url(world: Any, message: Any, suffix: str = "") -> str:
    return f"/inbox/{world.tenant.slug}/m/{message.pk}/{suffix}"


def test_it_sends_anonymous_visitors_to_sign_in(world: Any) -> None:
    message = message_deliver(world.mailbox, simple_message())
    for path in ("/inbox/", f"/inbox/{world.tenant.slug}/", _url(world, message), _url(world, message, "body/")):
        response = Client().get(path)
        assert response.status_code == 302 and response["Location"].startswith("/login/"), path


def test_it_lists_only_the_members_own_tenant(world: Any, signed_in: Any) -> None:
    message_deliver(world.mailbox, simple_message("Ours 1"))
    message_deliver(world.outsider_mailbox, simple_message("Theirs 2", to=world.outsider_mailbox.address))
    page = signed_in("viewer").get("/inbox/").content.decode()
    assert "Ours 1" in page and "Theirs 2" not in page
    assert world.mailbox.address in page and world.outsider_mailbox.address not in page


def test_it_answers_404_to_an_outsider(world: Any, signed_in: Any) -> None:
    message = message_deliver(world.mailbox, simple_message("Secret"))
    outsider = signed_in("outsider")
    paths = [
        f"/inbox/{world.tenant.slug}/",
        f"/inbox/{world.tenant.slug}/poll/",
        f"/inbox/{world.tenant.slug}/mailboxes/{world.mailbox.pk}/",
        _url(world, message),
        _url(world, message, "body/"),
        # their own tenant's URL with our ids
        f"/inbox/{world.outsider_tenant.slug}/m/{message.pk}/",
        f"/inbox/{world.outsider_tenant.slug}/m/{message.pk}/body/",
        f"/inbox/{world.outsider_tenant.slug}/mailboxes/{world.mailbox.pk}/",
    ]
    for path in paths:
        assert outsider.get(path).status_code == 404, path
    assert (
        outsider.post(f"/inbox/{world.outsider_tenant.slug}/m/{message.pk}/", {"action": "delete"}).status_code == 404
    )
    message.refresh_from_db()
    assert message.deleted_at is None


def test_it_neutralises_hostile_html(world: Any, signed_in: Any) -> None:
    message = message_deliver(world.mailbox, fixture_bytes("hostile_html.eml"))
    client = signed_in("owner")
    page = client.get(_url(world, message))
    html = page.content.decode()
    assert 'sandbox="allow-popups allow-popups-to-escape-sandbox"' in html
    assert "allow-scripts" not in html and "allow-same-origin" not in html
    assert "alert(" not in html
    body = client.get(_url(world, message, "body/"))
    document = body.content.decode().lower()
    for hostile in ("<script", "onerror", "onload", "javascript:", "expression(", "<iframe", "<form", "http-equiv"):
        assert hostile not in document, hostile
    assert "fine link" in document
    policy = body["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "sandbox" in policy and "script-src" not in policy
    assert body["X-Frame-Options"] == "SAMEORIGIN"
    assert "frame-ancestors 'none'" in page["Content-Security-Policy"]


def test_it_blocks_remote_images_until_asked(world: Any, signed_in: Any) -> None:
    raw = (
        b"From: a@sender.example\r\nTo: inbox@acme.example.test\r\nSubject: Pixel\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n\r\n"
        b'<p>Hi</p><img src="https://tracker.example/pixel.gif" alt="t">\r\n'
    )
    message = message_deliver(world.mailbox, raw)
    client = signed_in("member")
    page = client.get(_url(world, message)).content.decode()
    assert "Load images" in page
    blocked = client.get(_url(world, message, "body/"))
    assert ' src="https://tracker.example' not in blocked.content.decode()
    assert "https:" not in blocked["Content-Security-Policy"].split("img-src", 1)[1].split(";")[0]
    loaded = client.get(_url(world, message, "body/"), {"images": "1"})
    assert ' src="https://tracker.example/pixel.gif"' in loaded.content.decode()
    assert "https:" in loaded["Content-Security-Policy"]


def test_it_shows_codes_text_headers_and_raw(world: Any, signed_in: Any) -> None:
    message = message_deliver(world.mailbox, fixture_bytes("verification_code.eml"))
    client = signed_in("owner")
    page = client.get(_url(world, message)).content.decode()
    assert message.codes and message.codes[0] in page
    assert f'data-copy="{message.codes[0]}"' in page
    assert client.get(_url(world, message), {"tab": "text"}).status_code == 200
    assert client.get(_url(world, message), {"tab": "headers"}).status_code == 200
    raw = client.get(_url(world, message), {"tab": "raw"}).content.decode()
    assert "Subject:" in raw
    assert client.get(_url(world, message), {"tab": "<script>"}).status_code == 200


def test_it_downloads_the_raw_message_through_a_signed_url(world: Any, signed_in: Any) -> None:
    raw = simple_message("Download me")
    message = message_deliver(world.mailbox, raw)
    response = signed_in("viewer").get(_url(world, message))
    url = response.context["raw_url"]
    assert "X-Amz-Expires=" in url or "/blobs/" in url
    downloaded = requests.get(url, timeout=10)
    assert downloaded.status_code == 200
    assert hashlib.sha256(downloaded.content).hexdigest() == hashlib.sha256(raw).hexdigest()


def test_it_lets_a_viewer_read_but_not_change(world: Any, signed_in: Any) -> None:
    message = message_deliver(world.mailbox, simple_message())
    viewer = signed_in("viewer")
    assert viewer.get(_url(world, message)).status_code == 200
    message.refresh_from_db()
    assert message.is_read is False  # reading as a viewer changes nothing
    assert viewer.post(_url(world, message), {"action": "delete"}).status_code == 403
    message.refresh_from_db()
    assert message.deleted_at is None


def test_it_marks_tags_and_deletes_for_a_member(world: Any, signed_in: Any) -> None:
    message = message_deliver(world.mailbox, simple_message())
    member = signed_in("member")
    member.get(_url(world, message))
    message.refresh_from_db()
    assert message.is_read
    member.post(_url(world, message), {"action": "unread"})
    member.post(_url(world, message), {"action": "tags", "tags": "Invoices, urgent"})
    message.refresh_from_db()
    assert not message.is_read and message.tags == ["invoices", "urgent"]
    assert member.post(_url(world, message), {"action": "delete"}).status_code == 302
    message.refresh_from_db()
    assert message.deleted_at is not None
    assert message.state_reason == "deleted in the web inbox"  # not "through the API"


def test_it_labels_the_tags_box_visibly_with_a_placeholder(world: Any, signed_in: Any) -> None:
    message = message_deliver(world.mailbox, simple_message())
    page = signed_in("member").get(_url(world, message)).content.decode()
    label = re.search(r"<label([^>]*)for=\"id_tags\"[^>]*>([^<]*)</label>", page)
    assert label is not None and label.group(2) == "Tags"
    assert "sr-only" not in label.group(1)  # seen, not only read out by a screen reader
    field = re.search(r"<input[^>]*id=\"id_tags\"[^>]*>", page)
    assert field is not None
    placeholder = re.search(r'placeholder="([^"]+)"', field.group(0))
    assert placeholder is not None and "comma" in placeholder.group(1)


def test_it_refuses_message_writes_without_the_csrf_token(world: Any, signed_in: Any) -> None:
    message = message_deliver(world.mailbox, simple_message())
    client = signed_in("owner", csrf=True)
    assert client.post(_url(world, message), {"action": "delete"}).status_code == 403
    assert client.post("/logout/everywhere/").status_code == 403
    message.refresh_from_db()
    assert message.deleted_at is None


def test_it_polls_and_serves_the_list_fragment(world: Any, signed_in: Any) -> None:
    client = signed_in("viewer")
    since = timezone.now().isoformat()
    poll = f"/inbox/{world.tenant.slug}/mailboxes/{world.mailbox.pk}/poll/"
    assert client.get(poll, {"since": since}).json() == {"changed": False}
    message_deliver(world.mailbox, simple_message("Live one"))
    assert client.get(poll, {"since": since}).json() == {"changed": True}
    # Mail to the sibling mailbox does not wake a list of this one.
    assert client.get(f"/inbox/{world.tenant.slug}/mailboxes/{world.sibling.pk}/poll/", {"since": since}).json() == {
        "changed": False
    }
    fragment = client.get(f"/inbox/{world.tenant.slug}/mailboxes/{world.mailbox.pk}/", {"partial": "1"})
    assert "Live one" in fragment.content.decode() and "<html" not in fragment.content.decode()


def test_it_pages_with_a_keyset_cursor_and_searches(world: Any, signed_in: Any, settings: Any) -> None:
    from webinbox import selectors

    for n in range(5):
        message_deliver(world.mailbox, simple_message(f"Numbered {n}"))
    original = selectors.PAGE_SIZE
    selectors.PAGE_SIZE = 2
    try:
        client = signed_in("viewer")
        base = f"/inbox/{world.tenant.slug}/mailboxes/{world.mailbox.pk}/"
        seen: list[str] = []
        response = client.get(base)
        while True:
            seen += [m.subject for m in response.context["mail_list"]]
            older = response.context["page"].older
            if not older:
                break
            response = client.get(base, {"before": older})
        assert sorted(seen) == [f"Numbered {n}" for n in range(5)]
        assert len(seen) == 5
    finally:
        selectors.PAGE_SIZE = original
    searched = client.get(base, {"q": "subject:Numbered -subject:3"})
    assert {m.subject for m in searched.context["mail_list"]} == {f"Numbered {n}" for n in (0, 1, 2, 4)}
    broken = client.get(base, {"q": "before:notadate", "before": "garbage|x"})
    assert broken.status_code == 200


def test_it_shows_no_queue_id_and_its_notice_on_the_right_page(world: Any, signed_in: Any) -> None:
    kept = message_deliver(world.mailbox, simple_message("Kept"))
    gone = message_deliver(world.mailbox, simple_message("Gone"))
    client = signed_in("owner")
    for path in (
        "/inbox/",
        f"/inbox/{world.tenant.slug}/",
        f"/inbox/{world.tenant.slug}/mailboxes/{world.mailbox.pk}/",
    ):
        page = client.get(path).content.decode()
        assert "Kept" in page and kept.trace_id not in page and 'class="flash"' not in page, path
    landed = client.post(_url(world, gone), {"action": "delete"}, follow=True).content.decode()
    assert "Message deleted." in landed and "Kept" in landed and kept.trace_id not in landed
    assert "Message deleted." not in client.get("/inbox/").content.decode()


def test_it_says_when_the_tenants_ip_allowlist_blocks_this_address(world: Any) -> None:
    message_deliver(world.mailbox, simple_message("Behind the allowlist"))
    world.tenant.ip_allowlist = ["192.0.2.0/24"]
    world.tenant.save()
    elsewhere = Client(REMOTE_ADDR="198.51.100.4")
    elsewhere.force_login(world.member)
    html = unescape(elsewhere.get("/inbox/").content.decode())
    assert "Behind the allowlist" not in html and "not a member of any tenant" not in html
    assert f"{world.tenant.name}: the tenant's IP allowlist blocks your address (198.51.100.4)" in html
    blocked = elsewhere.get(f"/inbox/{world.tenant.slug}/")
    assert blocked.status_code == 403 and "IP allowlist blocks your address" in unescape(blocked.content.decode())
    inside = Client(REMOTE_ADDR="192.0.2.10")
    inside.force_login(world.member)
    assert "Behind the allowlist" in inside.get("/inbox/").content.decode()
