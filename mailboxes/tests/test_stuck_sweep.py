"""The stuck-message sweeper re-enqueues what no queued task holds, on the real broker."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from mailboxes import retention
from mailboxes.models import Message
from mailboxes.tasks import message_parse
from mailboxes.tests.helpers import message_store, simple_message
from mailplatform.queues import queue_purge, queue_waiting

pytestmark = pytest.mark.usefixtures("pipeline_queues_empty")


def _stuck(world: Any, count: int, *, minutes: int = 10) -> list[Message]:
    messages = [message_store(world.mailbox, simple_message(f"stuck {number}")) for number in range(count)]
    Message.objects.filter(pk__in=[message.pk for message in messages]).update(
        state_changed_at=timezone.now() - timedelta(minutes=minutes)
    )
    return messages


def test_it_leaves_messages_whose_tasks_wait_in_the_broker_and_requeues_them_once_lost(world: Any) -> None:
    messages = _stuck(world, 5)
    for message in messages:  # the drainer's enqueues, waiting behind a backlog: no worker runs
        message_parse.delay(str(message.pk))
    assert queue_waiting("parse") == 5

    assert retention.messages_stuck_requeue()["stored"] == 0
    assert queue_waiting("parse") == 5  # nothing doubled

    queue_purge("parse")  # the broker lost them (a restart without persistence)
    assert retention.messages_stuck_requeue()["stored"] == 5
    assert queue_waiting("parse") == 1  # one batch task for the five
    assert retention.messages_stuck_requeue()["stored"] == 0  # bumped, and queued again


def test_it_sends_stuck_messages_in_batches_and_the_batch_task_parses_them(world: Any, monkeypatch: Any) -> None:
    from mailboxes.tasks import messages_parse

    messages = _stuck(world, retention.REQUEUE_BATCH + 3)
    sent: list[list[str]] = []
    real = messages_parse.apply_async

    def apply_async(args: Any = None, *rest: Any, **options: Any) -> Any:
        sent.append(list(args[0]))
        return real(args, *rest, **options)

    monkeypatch.setattr(messages_parse, "apply_async", apply_async)
    assert retention.messages_stuck_requeue()["stored"] == len(messages)
    monkeypatch.undo()
    assert [len(batch) for batch in sent] == [retention.REQUEUE_BATCH, 3]
    assert sorted(pk for batch in sent for pk in batch) == sorted(str(message.pk) for message in messages)
    assert queue_waiting("parse") == 2

    queue_purge("parse")
    for batch in sent:  # what a worker does with them
        messages_parse.apply(args=(batch,))
    assert set(Message.objects.filter(pk__in=[m.pk for m in messages]).values_list("state", flat=True)) == {
        Message.State.INDEXED
    }


def test_it_requeues_a_message_stuck_for_long_even_behind_a_backlog(world: Any) -> None:
    waiting = _stuck(world, 3)
    for message in waiting:
        message_parse.delay(str(message.pk))
    (lost,) = _stuck(world, 1, minutes=45)  # its task was lost long ago; the queue never emptied

    assert retention.messages_stuck_requeue()["stored"] == 1
    assert Message.objects.get(pk=lost.pk).state_changed_at > timezone.now() - timedelta(minutes=1)
    assert queue_waiting("parse") == 4


def test_it_counts_the_queue_as_the_broker_holds_it(world: Any) -> None:
    assert queue_waiting("index") == 0
    from mailboxes.tasks import message_index

    message_index.delay("00000000-0000-0000-0000-000000000000")
    assert queue_waiting("index") == 1
    assert queue_waiting("parse") == 0
