"""Temporary inboxes: creation (web and API), the token as the only credential, expiry."""

from __future__ import annotations

import hashlib
import statistics
import time
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from mailboxes.models import Mailbox, Message
from mailboxes.tests.helpers import message_deliver, simple_message
from webinbox.models import TempInbox
from webinbox.services import temp_inbox_create, temp_tenant_get_or_create

pytestmark = pytest.mark.django_db


def _token(response: Any) -> str:
    assert response.status_code == 302, response.content
    location = response["Location"]
    assert location.startswith("/t/")
    return location.split("/")[2]


def _trimmed_mean(samples: list[float]) -> float:
    """The mean without the slowest and fastest tenth: the machine is shared, a stray pause is noise."""
    ordered = sorted(samples)
    cut = len(ordered) // 10
    return statistics.mean(ordered[cut : len(ordered) - cut])


def test_it_creates_a_temporary_inbox_from_the_home_page(settings: Any) -> None:
    client = Client()
    token = _token(client.post("/"))
    page = client.get(f"/t/{token}/")
    assert page.status_code == 200
    temp = TempInbox.objects.get()
    mailbox = temp.mailbox
    assert mailbox.kind == Mailbox.Kind.TEMPORARY
    assert mailbox.address.endswith("@" + settings.TEMP_INBOX_DOMAIN)
    assert len(mailbox.local_part) * 5 >= 80
    assert mailbox.address in page.content.decode()
    assert mailbox.tenant.plan == "temporary"
    assert mailbox.domain.state == "verified"
    assert abs((mailbox.expires_at - timezone.now()).total_seconds() - settings.TEMP_INBOX_TTL) < 60
    # Only the hash is stored; the token has at least 128 bits.
    assert len(token) >= 22
    assert temp.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in str(TempInbox.objects.values().get())
    assert page["Referrer-Policy"] == "same-origin"
    assert "no-store" in page["Cache-Control"]


def test_it_creates_the_platform_tenant_once() -> None:
    first = temp_tenant_get_or_create()
    second = temp_tenant_get_or_create()
    assert first == second


def test_it_creates_one_through_the_api_without_a_key(settings: Any) -> None:
    response = Client().post("/api/v1/temp-inboxes/")
    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == {"address", "inbox_url", "token", "expires_at"}
    assert body["inbox_url"] == f"{settings.BASE_URL}/t/{body['token']}/"
    assert body["address"].endswith(settings.TEMP_INBOX_DOMAIN)
    assert Client().get(f"/t/{body['token']}/").status_code == 200


def test_it_rate_limits_creation_per_ip_across_web_and_api(settings: Any) -> None:
    settings.TEMP_INBOX_RATE_PER_HOUR = 3
    client = Client()
    assert client.post("/").status_code == 302
    assert client.post("/api/v1/temp-inboxes/").status_code == 201
    assert client.post("/").status_code == 302
    limited = client.post("/api/v1/temp-inboxes/")
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    # Sliding window: the hour's 3 uses fade over the next hour, down to the 2 allowed a third of
    # the way in: the rest of this hour plus 1,200 s, whatever the minute of the hour.
    assert 1200 <= int(limited["Retry-After"]) <= 3600 + 1200
    assert client.post("/").status_code == 429
    other_ip = Client(REMOTE_ADDR="192.0.2.7")
    assert other_ip.post("/").status_code == 302
    assert TempInbox.objects.count() == 4


def test_it_answers_the_same_404_bytes_for_wrong_expired_and_deleted_tokens() -> None:
    expired, expired_token = temp_inbox_create(ip="127.0.0.1")
    Mailbox.objects.filter(pk=expired.mailbox_id).update(expires_at=timezone.now() - timedelta(seconds=1))
    _, deleted_token = temp_inbox_create(ip="127.0.0.1")
    client = Client()
    assert client.post(f"/t/{deleted_token}/delete/").status_code == 200
    answers = [
        client.get(f"/t/{token}/")
        for token in (expired_token, deleted_token, "x" * 43, "nonsense", expired_token[:-1] + "A")
    ]
    assert {answer.status_code for answer in answers} == {404}
    assert len({answer.content for answer in answers}) == 1
    for path in ("poll/", "m/00000000-0000-0000-0000-000000000000/"):
        assert client.get(f"/t/{expired_token}/{path}").content == answers[0].content


def test_it_takes_the_same_time_for_an_expired_and_a_missing_token() -> None:
    expired, expired_token = temp_inbox_create(ip="127.0.0.1")
    Mailbox.objects.filter(pk=expired.mailbox_id).update(expires_at=timezone.now() - timedelta(seconds=1))
    client = Client()
    missing_token = "M" * len(expired_token)
    timings: dict[str, list[float]] = {"expired": [], "missing": []}
    for _ in range(3):  # warm up templates and connections
        client.get(f"/t/{expired_token}/")
        client.get(f"/t/{missing_token}/")
    for _ in range(50):
        for name, token in (("expired", expired_token), ("missing", missing_token)):
            started = time.perf_counter()
            assert client.get(f"/t/{token}/").status_code == 404
            timings[name].append(time.perf_counter() - started)
    difference = abs(_trimmed_mean(timings["expired"]) - _trimmed_mean(timings["missing"]))
    assert difference < 0.003, timings


def test_it_extends_at_most_the_configured_number_of_times(settings: Any) -> None:
    settings.TEMP_INBOX_EXTENSIONS = 2
    temp, token = temp_inbox_create(ip="127.0.0.1")
    before = temp.mailbox.expires_at
    client = Client()
    for _ in range(3):
        assert client.post(f"/t/{token}/extend/").status_code == 302
    temp.refresh_from_db()
    temp.mailbox.refresh_from_db()
    assert temp.extensions == 2
    expected = before + timedelta(seconds=2 * settings.TEMP_INBOX_EXTENSION)
    assert abs((temp.mailbox.expires_at - expected).total_seconds()) < 5
    assert "Extend by" not in client.get(f"/t/{token}/").content.decode()


def test_it_deletes_now_with_the_mail_and_blobs(s3_server: Any, monkeypatch: Any) -> None:
    # Raw blobs younger than RECENT_BLOB are kept for a drain that may still reference them.
    monkeypatch.setattr("mailboxes.retention.RECENT_BLOB", timedelta(0))
    temp, token = temp_inbox_create(ip="127.0.0.1")
    message = message_deliver(temp.mailbox, simple_message(to=temp.mailbox.address))
    client = Client()
    assert client.post(f"/t/{token}/delete/").status_code == 200
    assert not Mailbox.objects.filter(pk=temp.mailbox_id).exists()
    assert not TempInbox.objects.exists()
    assert not Message.objects.filter(pk=message.pk).exists()
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=message.storage_key)
    assert listed.get("KeyCount", 0) == 0
    assert client.get(f"/t/{token}/").status_code == 404


def test_it_shows_its_own_messages_and_nobody_elses() -> None:
    mine, my_token = temp_inbox_create(ip="127.0.0.1")
    theirs, _ = temp_inbox_create(ip="127.0.0.1")
    own = message_deliver(mine.mailbox, simple_message("Mine 123456", to=mine.mailbox.address))
    other = message_deliver(theirs.mailbox, simple_message("Theirs", to=theirs.mailbox.address))
    client = Client()
    page = client.get(f"/t/{my_token}/").content.decode()
    assert "Mine 123456" in page and "Theirs" not in page
    assert client.get(f"/t/{my_token}/m/{own.pk}/").status_code == 200
    assert client.get(f"/t/{my_token}/m/{other.pk}/").status_code == 404
    assert client.get(f"/t/{my_token}/m/{other.pk}/body/").status_code == 404
    assert client.get(f"/t/{my_token}/m/not-a-uuid/").status_code == 404


def test_it_polls_for_new_mail_since_a_cursor() -> None:
    temp, token = temp_inbox_create(ip="127.0.0.1")
    client = Client()
    since = timezone.now().isoformat()
    assert client.get(f"/t/{token}/poll/", {"since": since}).json() == {"changed": False}
    message_deliver(temp.mailbox, simple_message("Fresh", to=temp.mailbox.address))
    assert client.get(f"/t/{token}/poll/", {"since": since}).json() == {"changed": True}
    partial = client.get(f"/t/{token}/", {"partial": "1"}).content.decode()
    assert "Fresh" in partial and "<html" not in partial
    assert client.get(f"/t/{token}/poll/", {"since": "garbage"}).status_code == 200


def test_it_expires_through_the_retention_sweeper() -> None:
    from mailboxes.retention import mailboxes_expire

    temp, token = temp_inbox_create(ip="127.0.0.1")
    Mailbox.objects.filter(pk=temp.mailbox_id).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert mailboxes_expire() == 1
    assert not TempInbox.objects.exists()
    assert Client().get(f"/t/{token}/").status_code == 404


def test_it_refuses_writes_without_the_csrf_token() -> None:
    _, token = temp_inbox_create(ip="127.0.0.1")
    client = Client(enforce_csrf_checks=True)
    assert client.post("/").status_code == 403
    assert client.post(f"/t/{token}/extend/").status_code == 403
    assert client.post(f"/t/{token}/delete/").status_code == 403
    assert client.get(f"/t/{token}/").status_code == 200


def test_it_shows_no_queue_id_and_its_notice_on_the_right_page() -> None:
    temp, token = temp_inbox_create(ip="127.0.0.1")
    message = message_deliver(temp.mailbox, simple_message("Listed", to=temp.mailbox.address))
    client = Client()
    page = client.get(f"/t/{token}/").content.decode()
    assert "Listed" in page
    # The mail list is not a list of flash notices: no "<queue id> -> <rcpt>" banner.
    assert message.trace_id not in page
    assert 'class="flash"' not in page
    extended = client.post(f"/t/{token}/extend/", follow=True).content.decode()
    assert "Extended." in extended and message.trace_id not in extended
    # Shown once, on the page the redirect lands on, not one page late.
    assert "Extended." not in client.get(f"/t/{token}/").content.decode()
