"""Rows written by one JSON-document INSERT: the same rows bulk_create wrote, in the order given."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.db import DataError, connection, transaction

from audit.models import Event
from audit.services import EventSpec, events_record
from mailboxes.models import Attachment
from mailboxes.tests.helpers import message_store
from mailplatform.rows import rows_insert

pytestmark = pytest.mark.django_db


def test_it_records_events_in_the_order_given_with_their_position(world: Any) -> None:
    specs = [
        EventSpec(world.tenant.pk, f"test.n{n}", {"n": n, "id": uuid.uuid4()}, f"t-{n}", mailbox_id=world.mailbox.pk)
        for n in range(5)
    ]
    with transaction.atomic():
        events = events_record(specs)
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_current_xact_id()::text::bigint")
                own = cursor.fetchone()[0]
            assert {event.txid for event in events} == {own}
    seqs = [event.seq for event in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5 and all(seqs)
    stored = list(Event.objects.filter(seq__in=seqs).order_by("seq"))
    assert [event.type for event in stored] == [f"test.n{n}" for n in range(5)]
    assert [event.public_id for event in stored] == [event.public_id for event in events]
    assert [event.as_json() for event in stored] == [event.as_json() for event in events]
    assert stored[2].data["n"] == 2 and stored[2].trace_id == "t-2"
    assert stored[2].mailbox_id == world.mailbox.pk and stored[2].txid == events[2].txid


def test_it_writes_every_column_as_save_would(world: Any) -> None:
    message = message_store(world.mailbox, b"Subject: x\r\n\r\nbody\r\n")
    rows = [
        Attachment(
            tenant_id=world.tenant.pk,
            message_id=message.pk,
            position=position,
            filename=f"naïve {position}.pdf",
            content_type="application/pdf",
            size=1000 + position,
            sha256="a" * 64,
            content_id="",
            is_inline=bool(position),
            storage_key=f"att/{world.tenant.pk}/{'a' * 64}",
        )
        for position in range(3)
    ]
    written = rows_insert(rows)
    assert written == rows and not any(row._state.adding for row in written)
    stored = {row.pk: row for row in Attachment.objects.filter(message=message)}
    assert set(stored) == {row.pk for row in rows}
    for row in rows:
        again = stored[row.pk]
        assert (again.position, again.filename, again.size, again.is_inline) == (
            row.position,
            row.filename,
            row.size,
            row.is_inline,
        )


def test_it_fails_a_value_postgresql_refuses_with_a_data_error(world: Any) -> None:
    """The parse batch falls back to one message at a time on a DataError (mailboxes.pipeline).
    SQLite stores a NUL in a text: there the row is written."""
    message = message_store(world.mailbox, b"Subject: x\r\n\r\nbody\r\n")
    row = Attachment(
        tenant_id=world.tenant.pk,
        message_id=message.pk,
        filename="bad\x00name",
        sha256="b" * 64,
        storage_key=f"att/{world.tenant.pk}/{'b' * 64}",
    )
    if connection.vendor != "postgresql":
        rows_insert([row])
        assert Attachment.objects.get(message=message).filename == "bad\x00name"
        return
    with pytest.raises(DataError), transaction.atomic():
        rows_insert([row])
    assert not Attachment.objects.filter(message=message).exists()
