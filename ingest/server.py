"""The runsmtp process model: a supervisor, N accept processes, a drainer, a metrics port.

- The supervisor forks INGEST_WORKERS accept processes. Each binds the port itself with
  SO_REUSEPORT (the kernel spreads connections across them, so both cores take mail), runs
  an asyncio loop (uvloop when installed) with its own recipient directory thread, and
  writes the spool with group commit. No accept process touches the database on the hot
  path: only the directory refresh reads it, every few seconds.
- The supervisor itself drains the spool in background threads (blob storage and the
  database are off the event loops entirely), restarts an accept process that dies, and
  serves Prometheus metrics on INGEST_METRICS_PORT aggregated over every process
  (prometheus_client multiprocess mode: files in METRICS_DIR, next to the web's and the
  workers', or in a per-run directory when METRICS_DIR is empty).
- Start-up problems (the SMTP or metrics port busy, the spool not writable) stop the
  supervisor with :class:`StartupError` before anything is forked. Accept processes die with
  the supervisor: the parent-death signal on Linux (``prctl(PR_SET_PDEATHSIG)``) and, on any
  platform, a pipe whose write end only the supervisor holds; an orphan would take mail with
  nobody draining it.
- SIGTERM is graceful: stop listening, ``421 4.3.2`` to idle sessions, transactions in DATA
  finish within INGEST_SHUTDOWN_GRACE seconds (:meth:`ingest.smtp.IngestHandler.sessions_close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import select
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import close_old_connections, connections

from ingest.spool import Spool
from mailplatform.hostnames import greeting_hostname

logger = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    host: str
    port: int
    lmtp: bool = False
    workers: int = 1
    drain: bool = True
    metrics_port: int = 0
    shutdown_grace: float = 5.0  # seconds a transaction in DATA may take to finish on SIGTERM
    wake_fd: int | None = None  # the drainer's wake-up pipe (write end), set by the supervisor
    parent_fd: int | None = None  # read end of the supervisor's life pipe: EOF when it dies


class StartupError(Exception):
    """runsmtp cannot start (a port busy, the spool not writable); nothing was forked."""


def multiprocess_metrics_enable() -> tuple[Path, bool]:
    """Multiprocess metrics for the supervisor and the processes it forks: (folder, owned).

    With METRICS_DIR set (settings.py switched this process over already) the node's folder,
    so the web's /metrics sees what the accept processes and the drainer count. Without it, a
    per-run folder of runsmtp's own (owned: removed when runsmtp stops), made before the
    accept processes fork.
    """
    from mailplatform.metrics import multiprocess_enabled

    if multiprocess_enabled():
        return Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]), False
    from prometheus_client import values

    directory = Path(tempfile.mkdtemp(prefix="mp-runsmtp-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue()
    if "ingest.metrics" in sys.modules:  # created with the in-memory class: recreate them
        import importlib

        from prometheus_client import REGISTRY

        module = sys.modules["ingest.metrics"]
        created = list(vars(module).values()) + list(getattr(module, "_created", {}).values())
        for collector in created:
            if hasattr(collector, "_name") and hasattr(collector, "collect"):
                with contextlib.suppress(KeyError):
                    REGISTRY.unregister(collector)
        importlib.reload(module)
    return directory, True


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def tls_context() -> ssl.SSLContext | None:
    """STARTTLS (RFC 3207) when a certificate and key are configured."""
    if not settings.SMTP_TLS_CERT_FILE:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.SMTP_TLS_CERT_FILE, settings.SMTP_TLS_KEY_FILE)
    return context


def _limits():  # type: ignore[no-untyped-def]
    from ingest.smtp import Limits

    return Limits(
        max_message_size=settings.INGEST_MAX_MESSAGE_SIZE,
        max_recipients=settings.INGEST_MAX_RECIPIENTS,
        connections_per_ip=settings.INGEST_MAX_CONNECTIONS_PER_IP,
        rate_per_ip=settings.INGEST_RATE_PER_IP,
        rate_per_tenant=settings.INGEST_RATE_PER_TENANT,
        command_timeout=float(settings.INGEST_COMMAND_TIMEOUT),
        connection_deadline=float(settings.INGEST_CONNECTION_DEADLINE),
        spool_low_water=settings.INGEST_SPOOL_LOW_WATER,
    )


async def serve_async(options: ServerOptions, stop: asyncio.Event, sock: socket.socket | None = None) -> None:
    """One accept process: the asyncio server until ``stop`` is set."""
    from ingest.directory import RecipientDirectory
    from ingest.smtp import IngestHandler, IngestLMTP, IngestSMTP
    from ingest.spool import SpoolWriter

    loop = asyncio.get_running_loop()
    directory = RecipientDirectory(refresh=float(settings.INGEST_DIRECTORY_REFRESH))
    await loop.run_in_executor(None, directory.start)
    writer = SpoolWriter(Spool(settings.SPOOL_DIR), notify=options.wake_fd)
    handler = IngestHandler(
        directory=directory,
        writer=writer,
        limits=_limits(),
        hostname=greeting_hostname(),
        source="lmtp" if options.lmtp else "smtp",
        trusted_proxies=settings.SMTP_TRUSTED_PROXIES,
    )
    protocol = IngestLMTP if options.lmtp else IngestSMTP
    context = tls_context()
    proxy_timeout = 10.0 if settings.SMTP_PROXY_PROTOCOL else None
    sock = sock or _listening_socket(options.host, options.port)
    server = await loop.create_server(
        lambda: protocol(handler, loop=loop, tls_context=context, proxy_protocol_timeout=proxy_timeout),
        sock=sock,
    )
    logger.info("accepting %s on %s:%s (pid %s)", protocol.protocol_name, options.host, options.port, os.getpid())
    try:
        await stop.wait()
    finally:
        sessions = len(handler.sessions)
        logger.info(
            "stopping: %d session%s, grace %gs (pid %s)",
            sessions,
            "" if sessions == 1 else "s",
            options.shutdown_grace,
            os.getpid(),
        )
        server.close()  # no new connections; then the live sessions, tracked by the handler
        await handler.sessions_close(options.shutdown_grace)
        directory.stop()
        writer.close()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies (Linux), and check it still lives.

    The signal is armed after the fork, so a supervisor that died in between is caught by
    the ``getppid`` check; other platforms rely on the life pipe alone.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _worker_main(options: ServerOptions, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent_pid)
    # aiosmtpd logs every command at INFO: too costly on the hot path, and addresses are
    # personal data. Our own lines carry the queue id.
    if settings.LOG_LEVEL != "DEBUG":
        logging.getLogger("mail.log").setLevel(logging.WARNING)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        if options.parent_fd is not None:
            # The supervisor holds the only write end: readable (EOF) means it is gone.
            loop.add_reader(options.parent_fd, stop.set)
        await serve_async(options, stop)

    asyncio.run(main())


class Drainer(threading.Thread):
    """Drains the spool continuously; backs off while blob storage or the database is down.

    The pending entries are split into one batch per thread (at most ``batch`` entries), and
    each batch is drained with one transaction (:func:`ingest.services.spool_entries_drain`):
    under load the work per message shrinks instead of the backlog growing. Accept processes
    wake the drainer through ``wake`` (a pipe) after each group commit; entries written by
    other processes (the API) are found by polling every ``idle`` seconds.
    """

    def __init__(
        self, spool: Spool, *, threads: int = 1, batch: int = 32, idle: float = 0.2, wake: int | None = None
    ) -> None:
        super().__init__(name="spool-drainer", daemon=True)
        self.spool = spool
        self.threads = threads
        self.batch = batch
        self.idle = idle
        self.wake = wake
        self.stopping = threading.Event()

    def _wait(self, seconds: float) -> None:
        if self.wake is None:
            self.stopping.wait(seconds)
            return
        readable, _, _ = select.select([self.wake], [], [], seconds)
        if readable:
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake, 4096)

    def run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from ingest import metrics
        from ingest.services import spool_entries_drain

        backoff = self.idle
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="drain")

        def drain(queue_ids: list[str]) -> bool:
            try:
                close_old_connections()
                spool_entries_drain(self.spool, queue_ids)
                return True
            except Exception as exc:
                metrics.DRAINED.labels("failed").inc(len(queue_ids))
                logger.warning("drain of %d entries failed, will retry: %s", len(queue_ids), type(exc).__name__)
                for connection in connections.all(initialized_only=True):
                    connection.close_if_unusable_or_obsolete()
                return False

        while not self.stopping.is_set():
            try:
                pending = self.spool.pending()
                metrics.SPOOL_DEPTH.set(len(pending))
                metrics.SPOOL_FREE_BYTES.set(self.spool.free_bytes())
            except OSError as exc:
                logger.error("cannot list the spool: %s", exc)
                pending = []
            if not pending:
                self._wait(self.idle)
                continue
            size = min(self.batch, -(-len(pending) // self.threads))
            taken = pending[: size * self.threads]
            batches = [taken[start : start + size] for start in range(0, len(taken), size)]
            results = list(pool.map(drain, batches))
            if all(results):
                backoff = self.idle
            elif not any(results):
                backoff = min(backoff * 2, 10.0)
                self.stopping.wait(backoff)
        pool.shutdown(wait=True)


def _spool_check(spool_dir: Path | str) -> Spool:
    """The spool, once it is known to take files (tmp/ and new/ writable)."""
    try:
        spool = Spool(spool_dir)
        descriptor, probe = tempfile.mkstemp(dir=spool.tmp, prefix=".probe-")
        os.close(descriptor)
        os.unlink(probe)
        if not os.access(spool.new, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable", str(spool.new))
    except OSError as exc:
        raise StartupError(f"the spool {spool_dir} is not writable: {exc.strerror or exc}") from None
    return spool


def _bind_check(what: str, host: str, port: int) -> None:
    # Without SO_REUSEPORT: a port another process listens on (even one sharing it with
    # SO_REUSEPORT, such as another runsmtp) fails here instead of being silently shared.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise StartupError(f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}") from None


def serve(options: ServerOptions) -> None:
    """Run runsmtp until SIGTERM or SIGINT; :class:`StartupError` before forking if it cannot."""
    spool = _spool_check(settings.SPOOL_DIR)
    # Fail now, in the supervisor, if the address cannot be bound.
    _bind_check("SMTP" if not options.lmtp else "LMTP", options.host, options.port)
    metrics_dir, metrics_dir_owned = multiprocess_metrics_enable()
    metrics_server = None
    if options.metrics_port:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(metrics_dir))
        try:
            metrics_server, _ = start_http_server(options.metrics_port, addr=options.host, registry=registry)
        except OSError as exc:
            if metrics_dir_owned:
                shutil.rmtree(metrics_dir, ignore_errors=True)
            raise StartupError(
                f"cannot serve metrics on {options.host}:{options.metrics_port}"
                f" (INGEST_METRICS_PORT): {exc.strerror or exc}"
            ) from None
        logger.info("metrics on http://%s:%s/metrics", options.host, options.metrics_port)
    swept = spool.sweep_tmp()
    if swept:
        logger.info("removed %d unfinished spool files (never acknowledged)", swept)
    connections.close_all()
    parent_pid = os.getpid()
    options.parent_fd, life_write = os.pipe()  # the write end never leaves the supervisor

    children: dict[int, int] = {}
    exited: list[int] = []  # accept processes that ended (their live gauges are dropped at exit)
    wake_read = None
    if options.drain:
        wake_read, options.wake_fd = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(options.wake_fd, False)

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(life_write)
                if metrics_server is not None:
                    metrics_server.socket.close()  # the supervisor's; never served here
                _worker_main(options, parent_pid)
            except BaseException:
                logger.exception("accept process %d failed", index)
                code = 1
            finally:
                os._exit(code)
        children[pid] = index

    for index in range(options.workers):
        spawn(index)

    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    drainer = None
    if options.drain:
        drainer = Drainer(spool, threads=settings.INGEST_DRAIN_THREADS, wake=wake_read)
        drainer.start()
    from ingest.heartbeats import smtp_heartbeat_start

    heartbeat = smtp_heartbeat_start(spool, port=options.port)  # /readyz: this node and its spool

    try:
        while not stopping.is_set():
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid, status = 0, 0
            if pid and pid in children:
                index = children.pop(pid)
                exited.append(pid)
                logger.error("accept process %d (pid %d) exited with %s; restarting", index, pid, status)
                time.sleep(0.5)
                spawn(index)
            stopping.wait(0.2)
    finally:
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        # The accept processes finish their DATA transactions within the grace period.
        deadline = time.monotonic() + options.shutdown_grace + 5
        while children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                children.pop(pid, None)
                exited.append(pid)
            else:
                time.sleep(0.05)
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            exited.append(pid)
        heartbeat.stop()
        if drainer is not None:
            drainer.stopping.set()
            drainer.join(timeout=30)
        if metrics_server is not None:
            metrics_server.shutdown()
        os.close(life_write)
        if metrics_dir_owned:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        else:  # the node's folder: the spool gauges of a runsmtp that stopped no longer count
            from mailplatform.metrics import process_dead

            for pid in (*exited, os.getpid()):
                process_dead(pid)
        logger.info("stopped")
