"""Running the IMAP and POP3 servers: listening sockets, TLS, signals, and a thread for tests.

Both are stateless: a session's state lives in its connection, everything else in
PostgreSQL and blob storage, so any number of ``runimap``/``runpop3`` processes can serve
behind a TCP balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from django.conf import settings

from mailaccess.limits import ConnectionLimits

logger = logging.getLogger(__name__)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def tls_context() -> ssl.SSLContext | None:
    """STARTTLS/STLS and the implicit-TLS ports: the mail-access certificate, else SMTP's."""
    if not settings.MAILACCESS_TLS_CERT_FILE:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.MAILACCESS_TLS_CERT_FILE, settings.MAILACCESS_TLS_KEY_FILE)
    return context


@dataclass
class Listener:
    host: str
    port: int
    implicit_tls: bool = False


def _ends_with_the_server(handle: Handler) -> Handler:
    """A connection's task, cancelled when the server stops (SIGINT, SIGTERM), ends quietly:
    the session is over with the server. Left cancelled, asyncio's stream callback (Python
    3.11, ``task.exception()`` on a cancelled task) logs it as an ERROR traceback."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await handle(reader, writer)

    return connection


def handler_for(protocol: str, *, implicit_tls: bool, limits: ConnectionLimits) -> Handler:
    return _ends_with_the_server(_protocol_handler(protocol, implicit_tls=implicit_tls, limits=limits))


def _protocol_handler(protocol: str, *, implicit_tls: bool, limits: ConnectionLimits) -> Handler:
    context = tls_context()
    if protocol == "imap":
        from mailaccess.imap import ImapOptions, handle_connection

        imap_options = ImapOptions(
            tls_context=context,
            implicit_tls=implicit_tls,
            limits=limits,
            idle_timeout=float(settings.MAILACCESS_IDLE_TIMEOUT),
        )
        return lambda reader, writer: handle_connection(reader, writer, imap_options)
    from mailaccess.pop3 import Pop3Options, handle_pop3

    pop3_options = Pop3Options(tls_context=context, implicit_tls=implicit_tls, limits=limits)
    return lambda reader, writer: handle_pop3(reader, writer, pop3_options)


async def serve(
    protocol: str, listeners: list[Listener], stop: asyncio.Event, started: Callable[[list[int]], None] | None = None
) -> None:
    """Listen until ``stop`` is set; ``started`` gets the bound ports (port 0 picks one)."""
    limits = ConnectionLimits()
    servers = []
    for listener in listeners:
        context = tls_context() if listener.implicit_tls else None
        if listener.implicit_tls and context is None:
            raise RuntimeError(
                f"{protocol}: an implicit-TLS port needs MAILACCESS_TLS_CERT_FILE (or SMTP_TLS_CERT_FILE)"
            )
        handler = handler_for(protocol, implicit_tls=listener.implicit_tls, limits=limits)
        servers.append(
            await asyncio.start_server(
                handler, listener.host, listener.port, ssl=context, limit=64 * 1024, backlog=1024
            )
        )
    ports = [server.sockets[0].getsockname()[1] for server in servers]
    logger.info(
        "%s listening on %s",
        protocol,
        ", ".join(f"{lst.host}:{port}" for lst, port in zip(listeners, ports, strict=True)),
    )
    if started is not None:
        started(ports)
    await stop.wait()
    for server in servers:
        server.close()
    for server in servers:
        await server.wait_closed()


def run_forever(protocol: str, listeners: list[Listener]) -> None:
    """The management commands' loop: SIGTERM and SIGINT stop it."""
    if settings.MAILACCESS_METRICS_PORT:
        from prometheus_client import start_http_server

        start_http_server(settings.MAILACCESS_METRICS_PORT, addr=listeners[0].host)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)

        def started(ports: list[int]) -> None:
            print(f"{protocol} ready on " + " ".join(str(port) for port in ports), flush=True)

        await serve(protocol, listeners, stop, started)

    asyncio.run(main())


@dataclass
class ServerThread:
    """A server in a thread of this process, on a free loopback port (tests, the benchmark)."""

    protocol: str
    implicit_tls: bool = False
    port: int = 0
    loop: asyncio.AbstractEventLoop | None = None
    thread: threading.Thread | None = None
    _stop: asyncio.Event | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    def start(self) -> ServerThread:
        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            asyncio.set_event_loop(loop)

            async def main() -> None:
                self._stop = asyncio.Event()

                def started(ports: list[int]) -> None:
                    self.port = ports[0]
                    self._ready.set()

                await serve(self.protocol, [Listener("127.0.0.1", 0, self.implicit_tls)], self._stop, started)
                # Sessions still open end with the server.
                others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
                for task in others:
                    task.cancel()
                await asyncio.gather(*others, return_exceptions=True)

            try:
                loop.run_until_complete(main())
            except BaseException as error:  # reported by start()
                self._error = error
                self._ready.set()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self.thread = threading.Thread(target=run, name=f"{self.protocol}-server", daemon=True)
        self.thread.start()
        if not self._ready.wait(20):
            raise RuntimeError(f"{self.protocol} server did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and not self.loop.is_closed():
            from django.db import connections

            from mailboxes.waiting import db

            # The database threads' connections end with the server (the test database is
            # dropped after the session).
            asyncio.run_coroutine_threadsafe(db(connections.close_all), self.loop).result(10)
            self.loop.call_soon_threadsafe(self._stop.set)
        if self.thread is not None:
            self.thread.join(10)
