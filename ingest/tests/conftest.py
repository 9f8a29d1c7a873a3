"""Ingest fixtures: an in-process SMTP/LMTP server on a real socket (runsmtp as a process: root conftest)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ingest.directory import RecipientDirectory
from ingest.smtp import IngestHandler, IngestLMTP, IngestSMTP, Limits
from ingest.spool import Spool, SpoolWriter


@dataclass
class RunningServer:
    host: str
    port: int
    spool: Spool
    handler: IngestHandler
    directory: RecipientDirectory
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    server: Any = None

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.handler.writer.close()


@pytest.fixture
def smtp_server(world: Any, tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start an in-process server; the directory is loaded once from the test's transaction."""
    started: list[RunningServer] = []

    def start(
        *, lmtp: bool = False, spool: Spool | None = None, directory: RecipientDirectory | None = None, **limits: Any
    ) -> RunningServer:
        if directory is None:
            # The test's transaction is invisible to the look-up threads, so misses are not
            # asked of the database here; runsmtp-process tests (test_directory.py) cover that.
            directory = RecipientDirectory(check_misses=False)
            assert directory.reload()
            directory.max_staleness = 3600  # no refresh thread here: trust the snapshot
        spool = spool or Spool(tmp_path / f"spool{len(started)}")
        handler = IngestHandler(
            directory=directory,
            writer=SpoolWriter(spool, threads=2),
            limits=Limits(**limits),
            hostname="mx.test",
            source="lmtp" if lmtp else "smtp",
            trusted_proxies=start.trusted_proxies,
        )
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        running = RunningServer("127.0.0.1", 0, spool, handler, directory, loop, threading.Thread())
        protocol = IngestLMTP if lmtp else IngestSMTP

        def run() -> None:
            asyncio.set_event_loop(loop)

            async def boot() -> None:
                running.server = await loop.create_server(
                    lambda: protocol(
                        handler, loop=loop, tls_context=start.tls_context, proxy_protocol_timeout=start.proxy_timeout
                    ),
                    "127.0.0.1",
                    0,
                )
                running.port = running.server.sockets[0].getsockname()[1]
                ready.set()

            loop.run_until_complete(boot())
            loop.run_forever()

        running.thread = threading.Thread(target=run, daemon=True)
        running.thread.start()
        assert ready.wait(10)
        started.append(running)
        return running

    start.tls_context = None  # type: ignore[attr-defined]
    start.proxy_timeout = None  # type: ignore[attr-defined]
    start.trusted_proxies = ["127.0.0.0/8"]  # type: ignore[attr-defined]
    yield start
    for running in started:
        running.stop()


def raw_session(port: int, payload: bytes, *, expect: int, timeout: float = 10.0) -> list[str]:
    """Send ``payload`` in one write (pipelining) and read until ``expect`` reply lines."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        buffer = b""
        sock.sendall(payload)
        while buffer.count(b"\r\n") < expect:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
    return [line for line in buffer.decode("ascii", "replace").split("\r\n") if line]


# runsmtp as a process: the ``runsmtp`` fixture of the root conftest.py (mailplatform.testing).


# --- A real Dovecot for the IMAP pull connectors (ingest/imap/) -----------------------------
@pytest.fixture(scope="session")
def dovecot() -> Iterator[Any]:
    """Debian's Dovecot in the foreground on a free loopback port, with IDLE (session-wide)."""
    from ingest.tests.dovecot import start_dovecot

    server = start_dovecot()
    yield server
    server.stop()


@pytest.fixture
def imap_account(dovecot: Any) -> Any:
    """A fresh account on the shared Dovecot (its own user and maildir)."""
    return dovecot.account_new()
