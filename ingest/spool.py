"""The durable spool: where a message lives between the SMTP 250 and blob storage.

Layout (Maildir-like, so a crash at any point leaves either nothing or a whole entry):

- ``SPOOL_DIR/tmp/<queue-id>``: being written; never read by the drainer, swept at start.
- ``SPOOL_DIR/new/<queue-id>``: durable, waiting for the drainer.
- ``SPOOL_DIR/hold/<queue-id>``: an entry the drainer could not read; kept for a human.

An entry is ``MPSPOOL1\\n``, one line of JSON (the envelope), then the raw message bytes.
Writing is: create in tmp, write, fdatasync, rename into new, fsync the directory; only then
may the server answer 250 (RFC 5321 section 4.1.1.4: "the receiver-SMTP MUST NOT ... send a
250 until it has taken responsibility for the message"). :class:`SpoolWriter` does the
renames of many concurrent sessions in one batch with one directory fsync (group commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.models import ulid

MAGIC = b"MPSPOOL1\n"


def queue_id_new() -> str:
    """A time-ordered queue id (ULID): also the trace id of everything that follows."""
    return ulid()


@dataclass
class Recipient:
    """One accepted recipient, resolved at RCPT time."""

    address: str  # as the client sent it
    mailbox_id: str
    tenant_id: str
    tags: list[str] = field(default_factory=list)


@dataclass
class Envelope:
    """What the spool entry carries besides the bytes (RFC 5321 section 2.3.1)."""

    queue_id: str
    mail_from: str
    recipients: list[Recipient]
    remote_ip: str | None
    helo: str
    tls: bool
    received_at: float
    source: str = "smtp"
    size: int = 0
    sha256: str = ""
    # The scan before the 250 (reject mode, ingest/smtp.py): verdict, signature, scanned_at.
    antivirus: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        data: dict[str, Any] = {
            "queue_id": self.queue_id,
            "mail_from": self.mail_from,
            "recipients": [vars(recipient) for recipient in self.recipients],
            "remote_ip": self.remote_ip,
            "helo": self.helo,
            "tls": self.tls,
            "received_at": self.received_at,
            "source": self.source,
            "size": self.size,
            "sha256": self.sha256,
        }
        if self.antivirus is not None:
            data["antivirus"] = self.antivirus
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        data: dict[str, Any] = json.loads(raw)
        data["recipients"] = [Recipient(**recipient) for recipient in data["recipients"]]
        return cls(**data)


class SpoolCorrupt(Exception):
    """The entry is not a spool entry this code can read."""


class Spool:
    """The spool directory and its synchronous primitives (run them off the event loop)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.new = self.root / "new"
        self.hold = self.root / "hold"
        for directory in (self.tmp, self.new, self.hold):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._free_checked = 0.0
        self._free_bytes = 0
        self._free_lock = threading.Lock()

    # --- writing --------------------------------------------------------------------
    def write_tmp(self, envelope: Envelope, content: bytes) -> Path:
        """Write and fdatasync ``spool/tmp/<queue-id>``; fills in size and sha256."""
        envelope.size = len(content)
        envelope.sha256 = hashlib.sha256(content).hexdigest()
        path = self.tmp / envelope.queue_id
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            chunks = [MAGIC, envelope.to_json(), b"\n", content]
            total = sum(len(chunk) for chunk in chunks)
            written = os.writev(fd, chunks)
            if written != total:  # a short write: finish it the slow way
                rest = b"".join(chunks)[written:]
                while rest:
                    rest = rest[os.write(fd, rest) :]
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return path

    def publish(self, queue_ids: list[str]) -> list[BaseException | None]:
        """Rename each tmp entry into new, then fsync new/ once; one result per id."""
        results: list[BaseException | None] = []
        for queue_id in queue_ids:
            try:
                os.rename(self.tmp / queue_id, self.new / queue_id)
                results.append(None)
            except OSError as exc:
                results.append(exc)
        if any(result is None for result in results):
            try:
                self.fsync_directory(self.new)
            except OSError as exc:
                # The renames may not survive a crash: report failure for all, and take the
                # entries back out of new/ so a 451 never leaves a copy that is drained later.
                for queue_id, result in zip(queue_ids, results, strict=True):
                    if result is None:
                        with contextlib.suppress(OSError):
                            os.rename(self.new / queue_id, self.tmp / queue_id)
                return [exc for _ in queue_ids]
        return results

    def discard_tmp(self, queue_id: str) -> None:
        (self.tmp / queue_id).unlink(missing_ok=True)

    @staticmethod
    def fsync_directory(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def store(self, envelope: Envelope, content: bytes) -> None:
        """Write one entry durably (the synchronous path: API upload, IMAP pull, tests)."""
        self.write_tmp(envelope, content)
        error = self.publish([envelope.queue_id])[0]
        if error is not None:
            self.discard_tmp(envelope.queue_id)
            raise error

    # --- reading --------------------------------------------------------------------
    def pending(self) -> list[str]:
        """Queue ids in new/, oldest first (ids are time-ordered)."""
        return sorted(os.listdir(self.new))

    def depth(self) -> int:
        return len(os.listdir(self.new))

    def read(self, queue_id: str) -> tuple[Envelope, bytes]:
        raw = (self.new / queue_id).read_bytes()
        if not raw.startswith(MAGIC):
            raise SpoolCorrupt(f"{queue_id}: not a spool entry")
        end = raw.find(b"\n", len(MAGIC))
        if end < 0:
            raise SpoolCorrupt(f"{queue_id}: no envelope line")
        try:
            envelope = Envelope.from_json(raw[len(MAGIC) : end])
        except (ValueError, TypeError, KeyError) as exc:
            raise SpoolCorrupt(f"{queue_id}: bad envelope: {exc}") from exc
        return envelope, raw[end + 1 :]

    def claim(self, queue_id: str, *, wait: float = 0.0) -> int | None:
        """Take ``new/<queue-id>`` for draining: an exclusive ``flock`` on the entry, held
        until :meth:`release`. Every drainer sharing this spool (runsmtp's, runimap's APPEND,
        the API's upload, connector runners, other nodes on the same volume) takes it first,
        so two never drain one entry at once. The kernel drops a dead process's locks, so a
        crashed drainer's claim is taken over at once.

        Returns the descriptor holding the claim, or None while another drainer holds it
        after ``wait`` seconds; raises FileNotFoundError when the entry is gone (the drainer
        before us finished it)."""
        path = self.new / queue_id
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(0.01)
        # The holder before us may have removed the entry, or moved it to hold/, meanwhile.
        held = os.fstat(fd)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is None or (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
            os.close(fd)
            raise FileNotFoundError(queue_id)
        return fd

    @staticmethod
    def release(fd: int) -> None:
        """End a claim of :meth:`claim`."""
        os.close(fd)

    def remove(self, queue_id: str) -> None:
        (self.new / queue_id).unlink(missing_ok=True)

    def move_to_hold(self, queue_id: str) -> None:
        os.rename(self.new / queue_id, self.hold / queue_id)

    def sweep_tmp(self, older_than: float = 0.0) -> int:
        """Remove tmp leftovers of a crash (never answered 250, so the client retries)."""
        removed = 0
        cutoff = time.time() - older_than
        for entry in os.scandir(self.tmp):
            try:
                if entry.stat().st_mtime <= cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def entries(self) -> Iterator[str]:
        yield from self.pending()

    # --- space ----------------------------------------------------------------------
    def free_bytes(self, max_age: float = 1.0) -> int:
        """Free bytes for unprivileged writers, cached for ``max_age`` seconds."""
        now = time.monotonic()
        if now - self._free_checked > max_age:
            with self._free_lock:
                stat = os.statvfs(self.root)
                self._free_bytes = stat.f_bavail * stat.f_frsize
                self._free_checked = now
        return self._free_bytes


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


class SpoolWriter:
    """Group commit for the event loop: many sessions' files, one directory fsync.

    Each session's bytes are written and fdatasynced by a thread pool, one thread per
    concurrent session up to ``threads`` (fsync releases the
    GIL, and the filesystem journal merges concurrent commits); the renames of all entries
    finished meanwhile are then done in one batch followed by a single fsync of new/.
    """

    def __init__(self, spool: Spool, *, threads: int = 64, notify: int | None = None) -> None:
        self.spool = spool
        self.notify = notify  # a pipe's write end: one byte after each commit wakes the drainer
        self._writers = ThreadPoolExecutor(threads, thread_name_prefix="spool-write")
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="spool-commit")
        self._waiting: list[tuple[str, asyncio.Future[None]]] = []
        self._committing = False
        self._commit_task: asyncio.Task[None] | None = None

    async def store(self, envelope: Envelope, content: bytes) -> None:
        """Return once the entry is durable in new/; raise (nothing left behind) otherwise."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writers, self.spool.write_tmp, envelope, content)
        done: asyncio.Future[None] = loop.create_future()
        self._waiting.append((envelope.queue_id, done))
        if not self._committing:
            self._committing = True
            self._commit_task = loop.create_task(self._commit())
        try:
            await done
        except BaseException:
            self.spool.discard_tmp(envelope.queue_id)
            raise

    async def _commit(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                ids = [queue_id for queue_id, _ in batch]
                try:
                    results = await loop.run_in_executor(self._committer, self.spool.publish, ids)
                except BaseException as exc:
                    results = [exc for _ in ids]
                if self.notify is not None and any(result is None for result in results):
                    with contextlib.suppress(OSError):  # full pipe: the drainer is awake already
                        os.write(self.notify, b"\0")
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if result is None:
                        future.set_result(None)
                    else:
                        future.set_exception(result)
        finally:
            self._committing = False

    def close(self) -> None:
        self._writers.shutdown(wait=True)
        self._committer.shutdown(wait=True)
