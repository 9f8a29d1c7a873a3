"""CoalescedEnqueue: many requests' items, few broker messages, nothing left behind."""

from __future__ import annotations

import threading
from typing import Any

from mailplatform.enqueue import CoalescedEnqueue


class SlowTask:
    """Stands in for a Celery task's apply_async: records each call, the first one slow, so
    items added meanwhile gather behind it as they do behind a broker round trip."""

    name = "test.slow"

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []
        self.first = threading.Event()
        self.release = threading.Event()

    def apply_async(self, args: tuple[Any, ...], **options: Any) -> None:
        self.calls.append(list(args[0]))
        if len(self.calls) == 1:
            self.first.set()
            self.release.wait(5)


def test_it_sends_what_gathers_during_a_send_as_batches_of_at_most_the_size() -> None:
    task = SlowTask()
    enqueue = CoalescedEnqueue(lambda: task, lambda: 3)
    enqueue.add(["a"])
    assert task.first.wait(5)
    for item in ["b", "c", "d", "e", "f"]:  # while "a" is being sent
        enqueue.add([item])
    task.release.set()
    enqueue.flush()
    assert task.calls == [["a"], ["b", "c", "d"], ["e", "f"]]


def test_flush_sends_what_is_left_when_the_sender_thread_is_gone() -> None:
    task = SlowTask()
    task.release.set()
    enqueue = CoalescedEnqueue(lambda: task, lambda: 20)
    enqueue._pending = ["x", "y"]  # as if added just before the thread died (process exit)
    enqueue.flush()
    assert task.calls == [["x", "y"]]
