"""The embedded broker hands a worker only whole messages, however fast they are put and taken:
one process putting, two taking, on one folder (as settings.py has it)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from queue import Empty
from typing import Any

from kombu import Connection

from mailplatform.brokers import Transport

MESSAGES = 6000


def _options(folder: Path) -> dict[str, Any]:
    queue = str(folder / "queue")
    return {
        "data_folder_in": queue,
        "data_folder_out": queue,
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
        "store_processed": False,
    }


def _put(transport: Any, folder: Path) -> None:
    with Connection(transport=transport, transport_options=_options(folder)) as connection:
        queue = connection.SimpleQueue("race")
        for number in range(MESSAGES):
            queue.put({"n": number, "padding": "x" * 4000})
        queue.close()
    (folder / "done").touch()


def _take(transport: Any, folder: Path, results: Any) -> None:
    received, errors = [], []
    with Connection(transport=transport, transport_options=_options(folder)) as connection:
        queue = connection.SimpleQueue("race")
        while True:
            try:
                message = queue.get(block=False)
            except Empty:
                if (folder / "done").exists() and not any((folder / "queue").glob("*.race.msg")):
                    break
                continue
            except Exception as error:  # what stops a worker
                errors.append(repr(error))
                continue
            received.append(message.payload["n"])
            message.ack()
        queue.close()
    results.put((received, errors))


def race(transport: Any, folder: Path) -> tuple[list[int], list[str]]:
    for name in ("queue", "processed", "control"):
        (folder / name).mkdir()
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    takers = [context.Process(target=_take, args=(transport, folder, results)) for _ in range(2)]
    putter = context.Process(target=_put, args=(transport, folder))
    for process in (*takers, putter):
        process.start()
    received: list[int] = []
    errors: list[str] = []
    deadline = time.monotonic() + 120
    for _ in takers:
        got, failed = results.get(timeout=max(1, deadline - time.monotonic()))
        received += got
        errors += failed
    for process in (*takers, putter):
        process.join(timeout=10)
    return received, errors


def test_a_worker_takes_every_message_whole_while_they_are_put(tmp_path: Path) -> None:
    received, errors = race(Transport, tmp_path)
    assert errors == []
    assert sorted(received) == list(range(MESSAGES))  # none lost, none twice
