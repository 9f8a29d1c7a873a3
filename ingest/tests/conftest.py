"""Ingest fixtures: an in-process SMTP/LMTP server on a real socket, and runsmtp as a process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection

from ingest.directory import RecipientDirectory
from ingest.smtp import IngestHandler, IngestLMTP, IngestSMTP, Limits
from ingest.spool import Spool, SpoolWriter
from mailplatform.testing import free_port, wait_for_port


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
            directory = RecipientDirectory()
            assert directory.reload()
            directory.max_staleness = 3600  # no refresh thread here: trust the snapshot
        spool = spool or Spool(tmp_path / f"spool{len(started)}")
        handler = IngestHandler(
            directory=directory,
            writer=SpoolWriter(spool, threads=2),
            limits=Limits(**limits),
            hostname="mx.test",
            source="lmtp" if lmtp else "smtp",
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


@dataclass
class RunsmtpProcess:
    port: int
    spool_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    def start(self, *args: str) -> None:
        log = self.spool_dir.parent / f"runsmtp-{len(self.logs)}.log"
        self.logs.append(log)
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "runsmtp", "--port", str(self.port), "--metrics-port", "0", *args],
            cwd=settings.BASE_DIR,
            env=self.env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill -9 reaches the workers too
        )
        wait_for_port("127.0.0.1", self.port, timeout=30)

    def kill9(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def log_text(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.logs if path.exists())


def database_url() -> str:
    """The test database (pytest-django's ``test_<name>``) as a URL for a subprocess."""
    params = connection.settings_dict
    user = params.get("USER") or "postgres"
    password = f":{params['PASSWORD']}" if params.get("PASSWORD") else ""
    host = params.get("HOST") or "127.0.0.1"
    port = params.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{params['NAME']}"


@pytest.fixture
def runsmtp(tmp_path: Path) -> Iterator[Callable[..., RunsmtpProcess]]:
    made: list[RunsmtpProcess] = []

    def make(**extra_env: str) -> RunsmtpProcess:
        spool_dir = tmp_path / "spool"
        env = dict(os.environ)
        env.update(
            {
                "DATABASE_URL": database_url(),
                "SPOOL_DIR": str(spool_dir),
                "INGEST_WORKERS": "1",
                "INGEST_DIRECTORY_REFRESH": "1",
                "INGEST_METRICS_PORT": "0",
                "LOG_LEVEL": "INFO",
                **extra_env,
            }
        )
        process = RunsmtpProcess(port=free_port(), spool_dir=spool_dir, env=env)
        made.append(process)
        return process

    yield make
    for process in made:
        process.stop()
