"""Draining the spool in batches: one transaction per batch, and exactly-once under races."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from audit.models import Event
from ingest.services import accept, spool_entries_drain
from ingest.spool import Recipient, Spool
from mailboxes.models import Message

BODY = b"From: a@example.org\r\nSubject: hello %d\r\n\r\nHello.\r\n"


def _recipient(mailbox: Any) -> Recipient:
    return Recipient(address=mailbox.address, mailbox_id=str(mailbox.pk), tenant_id=str(mailbox.tenant_id))


def _queue(world: Any, spool: Spool, count: int) -> list[str]:
    """``count`` entries, each for a mailbox of ours and one of the outsider's."""
    recipients = [_recipient(world.mailbox), _recipient(world.outsider_mailbox)]
    return [
        accept(content=BODY % number, mail_from="a@example.org", recipients=recipients, spool=spool)
        for number in range(count)
    ]


@pytest.mark.django_db
def test_it_drains_a_batch_with_a_number_of_queries_that_does_not_grow_with_it(world: Any, tmp_path: Any) -> None:
    spool = Spool(tmp_path / "spool")
    # Once per process: listeners look up and keep what they need (the bounce tenant's id).
    assert spool_entries_drain(spool, _queue(world, spool, 1)) == ["stored"]
    counts = []
    for size in (2, 12):
        queue_ids = _queue(world, spool, size)
        with CaptureQueriesContext(connection) as queries:
            assert spool_entries_drain(spool, queue_ids) == ["stored"] * size
        counts.append(len(queries))
    assert counts[0] == counts[1]
    assert spool.pending() == []
    assert Message.objects.count() == 2 * 15  # one per tenant's mailbox, per entry
    for message in Message.objects.all():
        types = list(Event.objects.filter(message_id=message.pk).order_by("seq").values_list("type", flat=True))
        assert types == ["ingest.received", "objectstore.uploaded"]
        assert message.tenant_id == message.mailbox.tenant_id


@pytest.mark.django_db
def test_it_reports_each_entry_of_a_batch_on_its_own(world: Any, tmp_path: Any) -> None:
    spool = Spool(tmp_path / "spool")
    first, second = _queue(world, spool, 2)
    saved = (spool.new / first).read_bytes()
    assert spool_entries_drain(spool, [first]) == ["stored"]
    (spool.new / first).write_bytes(saved)  # drained before a crash took the unlink with it
    (spool.new / "not-an-entry").write_bytes(b"garbage")
    outcomes = spool_entries_drain(spool, [first, "not-an-entry", "vanished", second])
    assert outcomes == ["duplicate", "held", "gone", "stored"]
    assert Message.objects.filter(trace_id=first).count() == 2
    assert Message.objects.filter(trace_id=second).count() == 2
    assert spool.pending() == []
    assert (spool.hold / "not-an-entry").exists()


@pytest.mark.django_db(transaction=True)
def test_it_settles_each_entry_alone_when_another_drainer_commits_one_first(world: Any, tmp_path: Any) -> None:
    """A concurrent drainer inserts one entry's row and commits while this batch waits on
    the unique index: the batch's transaction fails, and each entry is settled on its own."""
    spool = Spool(tmp_path / "spool")
    contested, other = _queue(world, spool, 2)
    envelope, _ = spool.read(contested)
    inserted, release, failures = threading.Event(), threading.Event(), []

    def concurrent_drainer() -> None:
        try:
            with transaction.atomic():
                Message.objects.create(
                    tenant=world.tenant,
                    mailbox=world.mailbox,
                    rcpt=world.mailbox.address,
                    size=envelope.size,
                    sha256=envelope.sha256,
                    storage_key="raw/elsewhere.eml",
                    trace_id=contested,
                    received_at=timezone.now(),
                )
                inserted.set()
                release.wait(30)
        except Exception as exc:  # reported to the test below
            failures.append(exc)
        finally:
            connection.close()

    def release_once_the_batch_waits() -> None:
        deadline = time.monotonic() + 30
        with connection.cursor() as cursor:
            while time.monotonic() < deadline:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
                if cursor.fetchone()[0]:
                    break
                time.sleep(0.02)
        connection.close()
        release.set()

    holder = threading.Thread(target=concurrent_drainer)
    holder.start()
    assert inserted.wait(10)
    releaser = threading.Thread(target=release_once_the_batch_waits)
    releaser.start()
    try:
        outcomes = spool_entries_drain(spool, [contested, other])
    finally:
        release.set()
        holder.join(10)
        releaser.join(10)
    assert failures == []
    # The contested entry still gets its outsider-tenant message; nothing is created twice.
    assert outcomes == ["stored", "stored"]
    assert Message.objects.filter(trace_id=contested, mailbox=world.mailbox).count() == 1
    assert Message.objects.filter(trace_id=contested).count() == 2
    assert Message.objects.filter(trace_id=other).count() == 2
    assert Event.objects.filter(type="ingest.received", message_id__isnull=False).count() == 3
    assert spool.pending() == []


@pytest.mark.django_db
def test_the_spool_writer_wakes_the_drainer_after_each_group_commit(world: Any, tmp_path: Any) -> None:
    import asyncio
    import os
    import select

    from ingest.spool import Envelope, SpoolWriter, queue_id_new

    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    writer = SpoolWriter(Spool(tmp_path / "spool"), threads=2, notify=wake_write)
    try:
        assert select.select([wake_read], [], [], 0)[0] == []
        envelope = Envelope(queue_id_new(), "a@example.org", [_recipient(world.mailbox)], None, "x", False, time.time())
        asyncio.run(writer.store(envelope, BODY % 1))
        assert select.select([wake_read], [], [], 5)[0] == [wake_read]
        assert writer.spool.pending() == [envelope.queue_id]
    finally:
        writer.close()
        os.close(wake_read)
        os.close(wake_write)


@pytest.mark.django_db(transaction=True)
def test_two_drainers_never_drain_one_entry_at_once_and_a_crashed_ones_claim_is_taken_over(
    world: Any, tmp_path: Any
) -> None:
    """Drainers sharing a spool (runsmtp's and runimap's APPEND) claim an entry before they
    drain it: a batch skips an entry another process holds, one entry alone waits for it,
    and the claim of a drainer that died goes with it."""
    import os
    import signal
    import subprocess
    import sys

    spool = Spool(tmp_path / "spool")
    held, other = _queue(world, spool, 2)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY);"
            " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(spool.new / held),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        assert spool_entries_drain(spool, [held, other]) == ["busy", "stored"]
        assert Message.objects.filter(trace_id=held).count() == 0
        assert (spool.new / held).exists()
        os.kill(holder.pid, signal.SIGKILL)  # the other drainer crashes mid-drain
        holder.wait(10)
        assert spool_entries_drain(spool, [held]) == ["stored"]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert Message.objects.filter(trace_id=held).count() == 2

    # One entry alone (APPEND waiting for its row) waits while another drainer finishes it.
    (waited,) = _queue(world, spool, 1)
    fd = spool.claim(waited)
    assert fd is not None
    finisher = threading.Timer(0.3, lambda: (spool_entries_drain_claimed(spool, waited), spool.release(fd)))
    finisher.start()
    try:
        assert spool_entries_drain(spool, [waited]) == ["gone"]
    finally:
        finisher.join(10)
    assert Message.objects.filter(trace_id=waited).count() == 2


def spool_entries_drain_claimed(spool: Spool, queue_id: str) -> None:
    """The other drainer's part: it drains the entry it holds, then lets go of it."""
    from django.db import connections

    from ingest.services import _claimed_entries_drain

    try:
        assert _claimed_entries_drain(spool, [queue_id]) == ["stored"]
    finally:
        connections.close_all()


@pytest.mark.django_db
def test_blob_put_of_the_same_bytes_by_racing_writers_succeeds_without_a_renamed_copy(tmp_path: Any) -> None:
    """The local blob folder saves a second file under a new name when the key appeared
    between exists() and save(): writers racing on one content-addressed key all succeed
    and leave the one object."""
    from django.core.files.storage import FileSystemStorage

    from ingest.services import blob_put

    storage = FileSystemStorage(location=tmp_path / "blobs")
    failures: list[BaseException] = []
    for number in range(20):
        key = f"raw/t/2026/12/02/{number:064d}.eml"
        content = b"x" * 200_000 + b"%d" % number
        barrier = threading.Barrier(6)

        def put(key: str = key, content: bytes = content, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                blob_put(storage, key, content)
            except BaseException as error:
                failures.append(error)

        writers = [threading.Thread(target=put) for _ in range(6)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(30)
    assert failures == []
    names = sorted(path.name for path in (tmp_path / "blobs" / "raw/t/2026/12/02").iterdir())
    assert names == [f"{number:064d}.eml" for number in range(20)]
    assert storage.open("raw/t/2026/12/02/" + f"{7:064d}.eml").read() == b"x" * 200_000 + b"7"
