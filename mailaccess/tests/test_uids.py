"""Per-mailbox UIDs: assigned where Message rows are created, strictly ascending per mailbox."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from ingest.services import accept, spool_entries_drain
from ingest.spool import Recipient, Spool
from mailboxes.models import Mailbox, Message

BODY = b"From: a@example.org\r\nSubject: hello %d\r\n\r\nHello.\r\n"


def _recipients(*mailboxes: Any) -> list[Recipient]:
    return [Recipient(address=box.address, mailbox_id=str(box.pk), tenant_id=str(box.tenant_id)) for box in mailboxes]


@pytest.mark.django_db
def test_it_numbers_each_mailbox_on_its_own_from_one(world: Any, tmp_path: Any) -> None:
    spool = Spool(tmp_path / "spool")
    ids = [
        accept(
            content=BODY % n,
            mail_from="a@example.org",
            recipients=_recipients(world.mailbox, world.sibling),
            spool=spool,
        )
        for n in range(3)
    ]
    ids.append(accept(content=BODY % 9, mail_from="", recipients=_recipients(world.mailbox), spool=spool))
    spool_entries_drain(spool, ids)
    mine = list(Message.objects.filter(mailbox=world.mailbox).order_by("uid").values_list("uid", "trace_id"))
    assert [uid for uid, _ in mine] == [1, 2, 3, 4]
    assert [trace for _, trace in mine] == ids
    assert list(Message.objects.filter(mailbox=world.sibling).order_by("uid").values_list("uid", flat=True)) == [
        1,
        2,
        3,
    ]
    world.mailbox.refresh_from_db()
    assert world.mailbox.uid_next == 5
    assert 0 < world.mailbox.uid_validity < 2**32


@pytest.mark.django_db(transaction=True)
def test_it_keeps_uids_unique_and_gapless_under_concurrent_drainers(world: Any, tmp_path: Any) -> None:
    """Four drainers race on one mailbox: the mailbox row lock hands out every UID exactly once."""
    from django.db import connection

    spools = [Spool(tmp_path / f"spool{n}") for n in range(4)]
    queues = [
        [accept(content=BODY % n, mail_from="", recipients=_recipients(world.mailbox), spool=spool) for n in range(10)]
        for spool in spools
    ]
    errors: list[BaseException] = []

    def drain(spool: Spool, queue_ids: list[str]) -> None:
        try:
            for queue_id in queue_ids:
                spool_entries_drain(spool, [queue_id])
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=drain, args=pair) for pair in zip(spools, queues, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    rows = list(Message.objects.filter(mailbox=world.mailbox).order_by("created_at").values_list("uid", flat=True))
    assert sorted(rows) == list(range(1, 41))
    assert Mailbox.objects.get(pk=world.mailbox.pk).uid_next == 41
