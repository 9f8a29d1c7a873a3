"""Attachment file names with control characters or path separators: stored clean, served safely.

A name is cleaned when the attachment is stored, and again when a download is signed, so a
row stored before the parse step cleaned names downloads too (RFC 6266: an ASCII
``filename`` fallback and the full Unicode name as RFC 8187 ``filename*``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
import requests
from django.test import Client

from mailboxes.models import Attachment
from mailboxes.parse import message_bytes_parse
from mailboxes.tests.helpers import fixture_bytes, message_deliver

HOSTILE = "../../résumé\r\nSet-Cookie: x=1\r\n.txt"
CLEAN = ".._.._résuméSet-Cookie: x=1.txt"


def _downloaded(url: str) -> requests.Response:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text[:500]
    return response


def _assert_safe_disposition(response: requests.Response, expected: str) -> None:
    disposition = response.headers["Content-Disposition"]
    assert "\r" not in disposition and "\n" not in disposition
    assert "Set-Cookie" not in response.headers
    assert f"filename*=UTF-8''{quote(expected, safe='')}" in disposition
    assert response.content == b"hello"


def test_it_cleans_control_characters_and_path_separators_from_names_at_parse_time() -> None:
    parsed = message_bytes_parse(fixture_bytes("corpus/crlf_filename.eml"))
    assert [a.filename for a in parsed.attachments] == [CLEAN.lstrip(".")]


@pytest.fixture
def stored_hostile_name(world: Any) -> Attachment:
    """An attachment row whose name still holds CR LF and slashes (stored before names were cleaned)."""
    message = message_deliver(world.mailbox, fixture_bytes("corpus/crlf_filename.eml"))
    attachment = message.attachments.get()
    Attachment.objects.filter(pk=attachment.pk).update(filename=HOSTILE)
    attachment.refresh_from_db()
    return attachment


def test_it_downloads_a_hostile_name_through_the_api(world: Any, stored_hostile_name: Attachment) -> None:
    attachment = stored_hostile_name
    client = world.client(world.owner_key)
    response = client.get(f"/api/v1/messages/{attachment.message_id}/attachments/{attachment.pk}/")
    assert response.status_code == 200, response.content
    _assert_safe_disposition(_downloaded(response.json()["url"]), CLEAN.lstrip("."))
    detail = client.get(f"/api/v1/messages/{attachment.message_id}/").json()
    _assert_safe_disposition(_downloaded(detail["attachments"][0]["download_url"]), CLEAN.lstrip("."))


def test_it_downloads_a_hostile_name_from_the_web_inbox(world: Any, stored_hostile_name: Attachment) -> None:
    client = Client()
    client.force_login(world.owner)
    page = client.get(f"/inbox/{world.tenant.slug}/m/{stored_hostile_name.message_id}/")
    assert page.status_code == 200
    [listed] = page.context["attachments"]
    _assert_safe_disposition(_downloaded(listed["url"]), CLEAN.lstrip("."))


def test_it_downloads_a_hostile_name_from_the_local_blob_folder(
    world: Any, stored_hostile_name: Attachment, settings: Any, tmp_path: Any
) -> None:
    """The embedded default (no S3) serves downloads itself: the same name must not break it."""
    from django.core.files.storage import storages

    from mailboxes import blobs

    content = blobs.blob_get(stored_hostile_name.storage_key)
    settings.STORAGES = {
        **settings.STORAGES,
        "blobs": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(tmp_path)}},
    }
    storages._storages.pop("blobs", None)  # the handler caches backends by alias
    try:
        blobs.blob_put(stored_hostile_name.storage_key, content)
        url = blobs.blob_signed_url(
            stored_hostile_name.storage_key, filename=stored_hostile_name.filename, content_type="text/plain"
        )
        path = url.split("://", 1)[1].split("/", 1)[1]
        response = Client().get(f"/{path}")
        assert response.status_code == 200
        disposition = response["Content-Disposition"]
        assert "\r" not in disposition and "\n" not in disposition
        assert f"filename*=UTF-8''{quote(CLEAN.lstrip('.'), safe='')}" in disposition
        assert b"".join(response.streaming_content) == b"hello"
    finally:
        storages._storages.pop("blobs", None)
