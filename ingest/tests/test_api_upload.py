"""POST /api/v1/mailboxes/{id}/messages/: a raw message through the same accept and spool."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.files.storage import storages
from django.test import override_settings

from ingest.services import spool_default, spool_drain
from mailboxes.models import Message

pytestmark = pytest.mark.django_db

RAW = b"From: api@example.org\r\nSubject: uploaded\r\n\r\nHi\r\n"


def upload(world: Any, key: str, mailbox: Any, body: bytes = RAW) -> Any:
    return world.client(key).post(
        f"/api/v1/mailboxes/{mailbox.pk}/messages/?mail_from=api@example.org", body, content_type="message/rfc822"
    )


def test_it_queues_a_raw_upload_and_drains_it_into_a_message(world: Any, tmp_path: Any) -> None:
    with override_settings(SPOOL_DIR=tmp_path / "spool"):
        response = upload(world, world.key(["messages:write"]), world.mailbox)
        assert response.status_code == 202, response.content
        queue_id = response.json()["queue_id"]
        assert spool_drain(spool_default()) == {"stored": 1}
    message = Message.objects.get()
    assert (message.trace_id, message.mailbox, message.source) == (queue_id, world.mailbox, "api")
    assert message.mail_from == "api@example.org"
    with storages["blobs"].open(message.storage_key) as handle:
        assert handle.read() == RAW


def test_it_answers_404_for_another_tenants_mailbox(world: Any, tmp_path: Any) -> None:
    with override_settings(SPOOL_DIR=tmp_path / "spool"):
        response = upload(world, world.owner_key, world.outsider_mailbox)
        assert response.status_code == 404
        assert spool_default().pending() == []


def test_it_answers_403_to_a_key_without_messages_write(world: Any, tmp_path: Any) -> None:
    with override_settings(SPOOL_DIR=tmp_path / "spool"):
        response = upload(world, world.key(["messages:read"]), world.mailbox)
        assert response.status_code == 403
        assert spool_default().pending() == []


def test_it_answers_413_over_the_tenants_size_limit(world: Any, tmp_path: Any) -> None:
    world.tenant.max_message_size = 64
    world.tenant.save()
    with override_settings(SPOOL_DIR=tmp_path / "spool"):
        response = upload(world, world.owner_key, world.mailbox, RAW * 4)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "message_too_large"
        assert spool_default().pending() == []
