"""Draining while the broker is down: the committed batch counts as drained, parsing waits."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
from celery.signals import before_task_publish
from prometheus_client import REGISTRY

from ingest.services import accept, spool_entries_drain
from ingest.spool import Recipient, Spool
from mailboxes.models import Message
from mailboxes.retention import messages_stuck_requeue
from mailplatform.testing import free_port

BODY = b"From: a@example.org\r\nSubject: hello %d\r\n\r\nHello.\r\n"
PARSE = "mailboxes.tasks.message_parse"
PARSE_BATCH = "mailboxes.tasks.messages_parse"  # what the drainer sends: one per drained batch


def _recipient(mailbox: Any) -> Recipient:
    return Recipient(address=mailbox.address, mailbox_id=str(mailbox.pk), tenant_id=str(mailbox.tenant_id))


@contextmanager
def _broker_unreachable() -> Iterator[None]:
    """The Celery app's broker pointed at a closed port (nothing listens there), then restored.

    Celery reads CELERY_BROKER_URL from the environment before its configuration.
    """
    from mailplatform.celery import app

    saved = os.environ["CELERY_BROKER_URL"]
    _pools_drop(app)  # pooled connections and producers of the real broker
    os.environ["CELERY_BROKER_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    try:
        assert app.connection_for_write().port != urlsplit(saved).port
        yield
    finally:
        _pools_drop(app)
        os.environ["CELERY_BROKER_URL"] = saved


def _pools_drop(app: Any) -> None:
    app._pool = None
    app.amqp._producer_pool = None


@pytest.fixture
def broker_down() -> Iterator[None]:
    with _broker_unreachable():
        yield


@pytest.fixture
def parse_sends() -> Iterator[list[str]]:
    """The message ids of every parse send attempted, one or a batch a task (Celery's before_task_publish)."""
    sent: list[str] = []

    def record(sender: str | None = None, body: Any = None, **kwargs: Any) -> None:
        if sender == PARSE:
            sent.append(body[0][0])
        elif sender == PARSE_BATCH:
            sent.extend(body[0][0])

    before_task_publish.connect(record, weak=False)
    yield sent
    before_task_publish.disconnect(record)


def _failed_count(task: str = PARSE_BATCH) -> float:
    return REGISTRY.get_sample_value("mailplatform_task_enqueue_failed_total", {"task": task}) or 0.0


@pytest.mark.django_db(transaction=True)
def test_it_reports_a_batch_drained_and_tries_every_parse_while_the_broker_is_down(
    world: Any, tmp_path: Any, broker_down: None, parse_sends: list[str]
) -> None:
    spool = Spool(tmp_path / "spool")
    recipients = [_recipient(world.mailbox), _recipient(world.outsider_mailbox)]
    queue_ids = [
        accept(content=BODY % number, mail_from="a@example.org", recipients=recipients, spool=spool)
        for number in range(3)
    ]
    failed_before = _failed_count()

    assert spool_entries_drain(spool, queue_ids) == ["stored"] * 3

    assert spool.pending() == []  # the files of a committed batch are gone: no re-drain
    messages = Message.objects.filter(trace_id__in=queue_ids, state=Message.State.STORED)
    ids = {str(pk) for pk in messages.values_list("pk", flat=True)}
    assert len(ids) == 6
    assert sorted(parse_sends) == sorted(ids)  # every message's parse was tried
    assert _failed_count() - failed_before == 1  # in one task for the batch


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("pipeline_queues_empty")
def test_it_leaves_the_unsent_parses_to_the_sweeper(world: Any, tmp_path: Any, parse_sends: list[str]) -> None:
    spool = Spool(tmp_path / "spool")
    queue_id = accept(content=BODY % 1, mail_from="a@example.org", recipients=[_recipient(world.mailbox)], spool=spool)
    with _broker_unreachable():
        assert spool_entries_drain(spool, [queue_id]) == ["stored"]
    message = Message.objects.get(trace_id=queue_id)
    parse_sends.clear()

    assert messages_stuck_requeue(older_than=timedelta(0))[Message.State.STORED] == 1
    assert parse_sends == [str(message.pk)]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_it_drains_each_entry_once_in_a_real_runsmtp_whose_broker_is_unreachable(world: Any, runsmtp: Any) -> None:
    import smtplib
    import time

    server = runsmtp(CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0", LOG_LEVEL="INFO")
    server.start()
    time.sleep(1.5)  # the directory has loaded
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        for number in range(3):
            assert smtp.sendmail("a@example.org", ["inbox@acme.example.test"], BODY % number) == {}
    deadline = time.monotonic() + 60
    while Message.objects.count() < 3 or list((server.spool_dir / "new").iterdir()):
        assert time.monotonic() < deadline, server.log_text()[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)  # a failed batch would be drained again by now
    server.stop()

    log = server.log_text()
    assert "drain of" not in log  # no batch reported failed
    assert "could not enqueue" in log  # the parses were tried, and left to the sweeper
    assert Message.objects.filter(state=Message.State.STORED).count() == 3
