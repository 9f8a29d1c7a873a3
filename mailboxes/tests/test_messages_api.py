"""Search language, the messages API, deletion, retention and the sweepers (PostgreSQL, S3)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from audit.models import Event
from mailboxes import blobs, retention
from mailboxes.models import Mailbox, Message
from mailboxes.search import QuerySyntaxError, query_filter
from mailboxes.tests.helpers import message_deliver, message_store, simple_message


@pytest.fixture
def corpus(world):
    old = timezone.now() - timedelta(days=40)
    return {
        "invoice": message_deliver(
            world.mailbox,
            simple_message("Invoice March", "Please pay the invoice total", sender="Billing <billing@shop.example>"),
            received_at=old,
        ),
        "party": message_deliver(
            world.mailbox,
            simple_message("Party tonight", "Bring snacks and the quarterly report", to="friends@acme.example.test"),
            tags=["social"],
        ),
        "big": message_deliver(world.mailbox, simple_message("Large", "x" * 200_000)),
        "sibling": message_deliver(world.sibling, simple_message("Invoice sibling", "invoice for the sibling")),
    }


def _ids(response):
    assert response.status_code == 200, response.content
    return [item["id"] for item in response.json()["results"]]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("invoice", {"invoice", "sibling"}),
        ('"quarterly report"', {"party"}),
        ('"report quarterly"', set()),
        ("from:billing@shop", {"invoice"}),
        ("from:Billing -invoice", set()),
        ("to:friends", {"party"}),
        ("subject:party", {"party"}),
        ("tag:social", {"party"}),
        ("-tag:social subject:invoice", {"invoice", "sibling"}),
        ("larger:100K", {"big"}),
        ("smaller:1K -subject:large", {"invoice", "party", "sibling"}),
        ("is:unread invoice -sibling", {"invoice"}),
        ("has:attachment", set()),
    ],
)
def test_it_searches_with_each_operator(world, corpus, query, expected):
    found = set(_ids(world.client(world.owner_key).get("/api/v1/messages/", {"q": query})))
    assert found == {str(corpus[name].pk) for name in expected}


def test_it_searches_dates_and_read_state(world, corpus):
    client = world.client(world.owner_key)
    day = (timezone.now() - timedelta(days=10)).date().isoformat()
    assert set(_ids(client.get("/api/v1/messages/", {"q": f"before:{day}"}))) == {str(corpus["invoice"].pk)}
    assert str(corpus["invoice"].pk) not in _ids(client.get("/api/v1/messages/", {"q": f"after:{day}"}))
    client.patch(f"/api/v1/messages/{corpus['party'].pk}/", {"is_read": True}, format="json")
    assert _ids(client.get("/api/v1/messages/", {"q": "is:read"})) == [str(corpus["party"].pk)]


def test_it_limits_a_scoped_key_to_its_mailboxes_results(world, corpus):
    scoped = world.client(world.key(["messages:read"], mailboxes=[world.sibling]))
    assert set(_ids(scoped.get("/api/v1/messages/", {"q": "invoice"}))) == {str(corpus["sibling"].pk)}
    assert scoped.get(f"/api/v1/messages/{corpus['invoice'].pk}/").status_code == 404


@pytest.mark.parametrize(
    ("query", "position"),
    [('subject:"unterminated', 9), ("color:red", 1), ("from:", 1), ("before:yesterday", 1), ("larger:big", 1)],
)
def test_it_answers_400_saying_where_a_query_is_wrong(world, query, position):
    response = world.client(world.owner_key).get("/api/v1/messages/", {"q": query})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_query"
    assert f"at character {position}" in error["message"]
    with pytest.raises(QuerySyntaxError):
        query_filter(Message.objects.all(), query)


def test_it_pages_newest_first_with_a_cursor(world):
    now = timezone.now()
    made = [
        message_deliver(world.mailbox, simple_message(f"n{i}"), received_at=now - timedelta(minutes=i))
        for i in range(5)
    ]
    client = world.client(world.owner_key)
    first = client.get("/api/v1/messages/", {"mailbox": str(world.mailbox.pk), "limit": 3}).json()
    second = client.get(first["next"]).json()
    ids = [item["id"] for item in first["results"] + second["results"]]
    assert ids == [str(message.pk) for message in made]


def test_it_shows_the_detail_patches_tags_and_soft_deletes_then_purges_blobs(world):
    message = message_deliver(world.mailbox, simple_message("Your code", "Your code is 135790"))
    client = world.client(world.owner_key)
    detail = client.get(f"/api/v1/messages/{message.pk}/").json()
    assert detail["codes"] == ["135790"]
    assert detail["from"] == {"name": "Alice", "address": "alice@sender.example"}
    assert detail["state"] == "indexed"
    patched = client.patch(f"/api/v1/messages/{message.pk}/", {"tags": ["Signup", "x"]}, format="json")
    assert patched.json()["tags"] == ["signup", "x"]
    assert client.patch(f"/api/v1/messages/{message.pk}/", {"tags": ["bad tag!"]}, format="json").status_code == 400
    assert client.delete(f"/api/v1/messages/{message.pk}/").status_code == 204
    assert client.get(f"/api/v1/messages/{message.pk}/").status_code == 404
    assert Event.objects.filter(message_id=message.pk, type="message.deleted").exists()
    assert blobs.blob_exists(message.storage_key)
    Message.objects.filter(pk=message.pk).update(deleted_at=timezone.now() - timedelta(hours=2))
    with_recent_guard = retention.RECENT_BLOB
    retention.RECENT_BLOB = timedelta(0)
    try:
        assert retention.messages_purge() == 1
    finally:
        retention.RECENT_BLOB = with_recent_guard
    assert not blobs.blob_exists(message.storage_key)
    message.refresh_from_db()
    assert message.purged_at is not None and message.text == ""


def test_it_keeps_a_blob_another_live_message_still_references(world):
    raw = simple_message("Shared")
    first = message_deliver(world.mailbox, raw)
    second = message_deliver(world.sibling, raw, received_at=first.received_at)
    assert first.storage_key == second.storage_key
    retention.message_soft_delete(first, reason="test")
    retention.RECENT_BLOB, saved = timedelta(0), retention.RECENT_BLOB
    try:
        retention.messages_purge()
    finally:
        retention.RECENT_BLOB = saved
    assert blobs.blob_exists(second.storage_key)


def test_it_applies_retention_per_mailbox_over_the_tenant(world):
    world.tenant.retention_days = 30
    world.tenant.save()
    Mailbox.objects.filter(pk=world.sibling.pk).update(retention_days=90)
    old = timezone.now() - timedelta(days=45)
    expired = message_deliver(world.mailbox, simple_message("old"), received_at=old)
    kept = message_deliver(world.sibling, simple_message("old too"), received_at=old)
    assert retention.messages_retention_apply() == 1
    assert Message.objects.get(pk=expired.pk).state == Message.State.DELETED
    assert Message.objects.get(pk=kept.pk).deleted_at is None


def test_it_expires_temporary_mailboxes_with_their_mail(world):
    Mailbox.objects.filter(pk=world.sibling.pk).update(
        kind=Mailbox.Kind.TEMPORARY, expires_at=timezone.now() - timedelta(minutes=1)
    )
    message = message_deliver(world.sibling, simple_message("temp mail"))
    assert retention.mailboxes_expire() == 1
    assert not Mailbox.objects.filter(pk=world.sibling.pk).exists()
    assert not Message.objects.filter(pk=message.pk).exists()
    assert Event.objects.filter(type="mailbox.expired", mailbox_id=world.sibling.pk).exists()


@pytest.mark.usefixtures("pipeline_queues_empty")
def test_it_requeues_stuck_messages_and_reports_the_index_lag(world):
    stuck = message_store(world.mailbox, simple_message("stuck"), received_at=timezone.now() - timedelta(minutes=10))
    Message.objects.filter(pk=stuck.pk).update(state_changed_at=timezone.now() - timedelta(minutes=10))
    lag = next(retention.IndexLagCollector().collect()).samples[0].value
    assert lag >= 590
    assert retention.messages_stuck_requeue()["stored"] == 1
    assert retention.messages_stuck_requeue()["stored"] == 0  # bumped: not re-enqueued every sweep


def test_it_answers_the_latest_code_or_404_without_waiting(world):
    client = world.client(world.owner_key)
    response = client.get(f"/api/v1/mailboxes/{world.mailbox.pk}/codes/latest/")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "no_code"
    message_deliver(world.mailbox, simple_message("Your verification code", "Your code is 774411"))
    body = client.get(f"/api/v1/mailboxes/{world.mailbox.pk}/codes/latest/").json()
    assert body["code"] == "774411"
