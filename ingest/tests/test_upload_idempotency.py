"""Idempotency-Key on POST /api/v1/mailboxes/{id}/messages/: a retried upload is queued once."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from ingest.idempotency import idempotency_keys_purge
from ingest.models import UploadIdempotencyKey
from ingest.services import spool_default

RAW = b"From: api@example.org\r\nSubject: uploaded\r\n\r\nHi\r\n"


def upload(world: Any, key: str, mailbox: Any, body: bytes = RAW, **headers: str) -> Any:
    return world.client(key).post(
        f"/api/v1/mailboxes/{mailbox.pk}/messages/?mail_from=api@example.org",
        body,
        content_type="message/rfc822",
        headers=headers,
    )


@pytest.fixture
def spool_dir(tmp_path: Any) -> Any:
    with override_settings(SPOOL_DIR=tmp_path / "spool"):
        yield tmp_path / "spool"


@pytest.mark.django_db
def test_it_queues_an_upload_sent_three_times_with_one_key_once(world: Any, spool_dir: Any) -> None:
    answers = [upload(world, world.owner_key, world.mailbox, **{"Idempotency-Key": "order-42"}) for _ in range(3)]

    assert [answer.status_code for answer in answers] == [202, 202, 202]
    assert answers[1].json() == answers[2].json() == answers[0].json()
    assert "Idempotent-Replayed" not in answers[0]
    assert answers[1]["Idempotent-Replayed"] == answers[2]["Idempotent-Replayed"] == "true"
    assert spool_default().pending() == [answers[0].json()["queue_id"]]


@pytest.mark.django_db
def test_it_queues_each_upload_without_a_key(world: Any, spool_dir: Any) -> None:
    for _ in range(2):
        assert upload(world, world.owner_key, world.mailbox).status_code == 202
    assert len(spool_default().pending()) == 2


@pytest.mark.django_db
def test_it_refuses_a_key_reused_for_another_request(world: Any, spool_dir: Any) -> None:
    headers = {"Idempotency-Key": "k-1"}
    first = upload(world, world.owner_key, world.mailbox, **headers)
    other_body = upload(world, world.owner_key, world.mailbox, RAW + b"more\r\n", **headers)
    other_mailbox = upload(world, world.owner_key, world.sibling, **headers)

    assert first.status_code == 202
    for answer in (other_body, other_mailbox):
        assert answer.status_code == 422
        assert answer.json()["error"]["code"] == "idempotency_key_reused"
    assert spool_default().pending() == [first.json()["queue_id"]]


@pytest.mark.django_db
def test_it_scopes_keys_to_the_principal_that_sent_them(world: Any, spool_dir: Any) -> None:
    headers = {"Idempotency-Key": "shared-name"}
    mine = upload(world, world.owner_key, world.mailbox, **headers)
    another_key = upload(world, world.key(["messages:write"], name="second"), world.mailbox, **headers)
    outsider = upload(world, world.outsider_key, world.outsider_mailbox, **headers)

    assert [mine.status_code, another_key.status_code, outsider.status_code] == [202, 202, 202]
    assert len({mine.json()["queue_id"], another_key.json()["queue_id"], outsider.json()["queue_id"]}) == 3
    assert len(spool_default().pending()) == 3


@pytest.mark.django_db
def test_it_refuses_a_key_that_is_not_printable_ascii_or_too_long(world: Any, spool_dir: Any) -> None:
    for bad in ("x" * 256, "   ", "caf\u00e9"):
        answer = upload(world, world.owner_key, world.mailbox, **{"Idempotency-Key": bad})
        assert answer.status_code == 400, bad
        assert answer.json()["error"]["code"] == "idempotency_key_invalid"
    assert spool_default().pending() == []


@pytest.mark.django_db
def test_it_forgets_a_key_after_its_lifetime_and_the_sweep_deletes_it(world: Any, spool_dir: Any) -> None:
    headers = {"Idempotency-Key": "old"}
    first = upload(world, world.owner_key, world.mailbox, **headers)
    UploadIdempotencyKey.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    again = upload(world, world.owner_key, world.mailbox, **headers)
    assert again.status_code == 202
    assert again.json()["queue_id"] != first.json()["queue_id"]

    UploadIdempotencyKey.objects.create(
        tenant=world.tenant,
        principal="api_key:gone",
        key="expired",
        fingerprint="0" * 64,
        response_status=202,
        response_body={},
        created_at=timezone.now() - timedelta(days=2),
        expires_at=timezone.now() - timedelta(days=1),
    )
    assert idempotency_keys_purge() == 1
    assert list(UploadIdempotencyKey.objects.values_list("key", flat=True)) == ["old"]


@pytest.mark.django_db
def test_it_leaves_no_key_behind_when_the_upload_fails(world: Any, spool_dir: Any) -> None:
    spool_dir.parent.mkdir(exist_ok=True)
    spool_dir.write_bytes(b"")  # the spool cannot be created: every upload fails with 503
    headers = {"Idempotency-Key": "retry-me"}
    failed = upload(world, world.owner_key, world.mailbox, **headers)
    assert failed.status_code == 503
    assert not UploadIdempotencyKey.objects.exists()
    spool_dir.unlink()
    assert upload(world, world.owner_key, world.mailbox, **headers).status_code == 202


@pytest.mark.django_db(transaction=True)
def test_it_queues_concurrent_duplicates_once(world: Any, spool_dir: Any) -> None:
    assert connection.vendor == "postgresql"
    barrier = threading.Barrier(6)
    answers: list[Any] = []

    def send() -> None:
        try:
            barrier.wait()
            answers.append(upload(world, world.owner_key, world.mailbox, **{"Idempotency-Key": "race"}))
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert [answer.status_code for answer in answers] == [202] * 6
    assert len({answer.json()["queue_id"] for answer in answers}) == 1
    assert len(spool_default().pending()) == 1


def test_it_documents_the_header_in_the_schema(client: Any, db: Any) -> None:
    schema = json.loads(client.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").content)
    operation = schema["paths"]["/api/v1/mailboxes/{id}/messages/"]["post"]
    (parameter,) = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
    assert parameter["in"] == "header"
    assert "422" in operation["responses"]
