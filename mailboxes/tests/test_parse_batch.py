"""The parse step over a batch of stored messages: one load, one transaction, the same guarantees."""

from __future__ import annotations

from typing import Any

import pytest

from audit.models import Event
from mailboxes import blobs, pipeline
from mailboxes.models import Message
from mailboxes.tests.helpers import fixture_bytes, message_store, simple_message

pytestmark = pytest.mark.django_db


def _states(*messages: Message) -> list[str]:
    return [Message.objects.get(pk=message.pk).state for message in messages]


def test_it_indexes_a_batch_with_its_events_in_the_batch_order_and_each_message_once(world: Any) -> None:
    first = message_store(world.mailbox, fixture_bytes("nested_multipart.eml"))
    second = message_store(world.mailbox, simple_message("Your code 482913", "Use 482913 to sign in"))
    third = message_store(world.mailbox, simple_message("Third"))
    ids = [third.pk, first.pk, second.pk]

    result = pipeline.messages_parse(message_ids=[*ids, first.pk])  # an id twice is taken once

    assert result.outcomes == {str(pk): "indexed" for pk in ids}
    assert result.retry == []
    assert _states(first, second, third) == ["indexed"] * 3
    events = Event.objects.filter(type="indexer.indexed", message_id__in=ids).order_by("seq")
    assert [event.message_id for event in events] == ids  # the log's order is the batch's
    assert len({event.txid for event in events}) == 1  # one transaction
    assert first.attachments.count() == 2
    assert Message.objects.get(pk=second.pk).codes[0] == "482913"
    # Run again (a redelivered task): nothing is written twice.
    again = pipeline.messages_parse(message_ids=ids)
    assert again.outcomes == {str(pk): "skipped" for pk in ids}
    assert Event.objects.filter(type="indexer.indexed", message_id__in=ids).count() == 3
    assert first.attachments.count() == 2


def test_it_quarantines_skips_and_retries_within_a_batch_without_holding_back_the_rest(
    world: Any, monkeypatch: Any
) -> None:
    good = message_store(world.mailbox, simple_message("Good"))
    garbage = message_store(world.mailbox, fixture_bytes("garbage.eml"))
    done = message_store(world.mailbox, simple_message("Done already"))
    assert pipeline.message_parse(message_id=done.pk, index=True) == "indexed"
    flaky = message_store(world.mailbox, simple_message("Blob storage hiccup"))
    real_get = blobs.blob_get

    def blob_get(key: str) -> bytes:
        if key == flaky.storage_key:
            raise OSError("connection reset")  # the object is there: a transient failure
        return real_get(key)

    monkeypatch.setattr(blobs, "blob_get", blob_get)

    result = pipeline.messages_parse(message_ids=[good.pk, garbage.pk, done.pk, flaky.pk])

    assert result.outcomes == {str(good.pk): "indexed", str(garbage.pk): "quarantined", str(done.pk): "skipped"}
    assert result.retry == [str(flaky.pk)]
    assert _states(good, garbage, done, flaky) == ["indexed", "quarantined", "indexed", "stored"]
    assert Event.objects.filter(type="message.quarantined", message_id=garbage.pk).count() == 1
    assert Event.objects.filter(type="indexer.indexed", message_id=done.pk).count() == 1


def test_a_search_document_refused_in_a_batch_keeps_that_parse_and_writes_the_others(
    world: Any, monkeypatch: Any
) -> None:
    before = message_store(world.mailbox, simple_message("Before"))
    refused = message_store(world.mailbox, simple_message("Refused document"))
    after = message_store(world.mailbox, simple_message("After"))
    real = pipeline.search_texts

    def search_texts(fields: dict[str, Any]) -> tuple[str, str, str]:
        if fields["subject"] == "Refused document":  # a search text PostgreSQL does not take
            return ("\x00", "", "")
        return real(fields)

    monkeypatch.setattr(pipeline, "search_texts", search_texts)

    result = pipeline.messages_parse(message_ids=[before.pk, refused.pk, after.pk])

    assert result.outcomes == {str(before.pk): "indexed", str(refused.pk): "parsed", str(after.pk): "indexed"}
    assert _states(before, refused, after) == ["indexed", "parsed", "indexed"]
    assert Event.objects.filter(type="indexer.indexed", message_id__in=[before.pk, refused.pk, after.pk]).count() == 2
    assert pipeline.message_index(message_id=refused.pk) is True  # the index queue's turn


def test_a_message_whose_mailbox_went_meanwhile_is_skipped(world: Any) -> None:
    kept = message_store(world.mailbox, simple_message("Kept"))
    orphan = message_store(world.mailbox, simple_message("Orphan"))
    Message.objects.filter(pk=orphan.pk).update(mailbox=None)

    result = pipeline.messages_parse(message_ids=[kept.pk, orphan.pk])

    assert result.outcomes == {str(kept.pk): "indexed", str(orphan.pk): "skipped"}
    assert _states(kept, orphan) == ["indexed", "stored"]


def test_it_writes_the_search_document_the_index_step_would_build_from_the_row(world: Any) -> None:
    from mailboxes.pipeline import search_vector_expression

    messages = [
        message_store(world.mailbox, fixture_bytes("nested_multipart.eml")),
        message_store(world.mailbox, simple_message("Invoice 2231 for Ada", "Your code 482913, thanks")),
    ]

    pipeline.messages_parse(message_ids=[message.pk for message in messages])

    rows = Message.objects.filter(pk__in=[message.pk for message in messages]).annotate(
        expected=search_vector_expression()
    )
    for row in rows:
        assert row.search_vector and str(row.search_vector) == str(row.expected)
    found = Message.objects.filter(search_vector="482913").values_list("pk", flat=True)
    assert list(found) == [messages[1].pk]
