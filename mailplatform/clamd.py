"""A clamd client: the INSTREAM command over TCP or a unix socket (clamd(8), "INSTREAM").

One small module instead of a library because both sides of the mail path need it: the SMTP
server scans before the 250 (reject mode, :func:`scan_async`, a thread off its event loop),
the parse worker and the rescan API scan synchronously (:func:`scan`). The protocol is short:
``zINSTREAM\\0``, then chunks of ``<4-byte big-endian length><bytes>``, a zero-length chunk,
and one NUL-terminated reply: ``stream: OK``, ``stream: <signature> FOUND``, or
``... ERROR`` (``INSTREAM size limit exceeded. ERROR`` past clamd's StreamMaxLength).

CLAMD_URL is ``tcp://host:port`` or ``unix:///path/to/clamd.ctl``; empty: scanning is off.
CLAMD_STREAM_MAX_LENGTH must match clamd's StreamMaxLength: a message larger than it is not
sent at all and comes back ``too_large`` (never "clean"); should clamd's limit be the smaller
one, its refusal is read as ``too_large`` too. Every failure to get an answer (refused,
reset, timed out, a reply we cannot read) is ``error``, for the caller to fail closed or open.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit

from django.conf import settings
from prometheus_client import Counter, Histogram

logger = logging.getLogger(__name__)

CHUNK = 64 * 1024
MAX_REPLY = 4096
SCAN_THREADS = 16  # scans at once per SMTP process; more wait their turn

_metrics: tuple[Counter, Histogram] | None = None


def metrics() -> tuple[Counter, Histogram]:
    """(scans by stage and result, scan time by stage), made on first use.

    Not at import: settings.py imports this module (to check CLAMD_URL) before it switches
    prometheus_client to multiprocess mode, and a metric made before that stays in memory.
    """
    global _metrics
    if _metrics is None:
        _metrics = (
            Counter(
                "antivirus_scans_total",
                "clamd scans, by where they ran (smtp, pipeline, rescan) and result"
                " (clean, infected, error, too_large)",
                ["stage", "result"],
            ),
            Histogram(
                "antivirus_scan_seconds",
                "Time of one clamd scan (INSTREAM round trip)",
                ["stage"],
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            ),
        )
    return _metrics


class ClamdUrlInvalid(ValueError):
    """CLAMD_URL is neither tcp://host:port nor unix:///path."""


@dataclass(frozen=True)
class ClamdAddress:
    host: str = ""
    port: int = 0
    path: str = ""  # a unix socket

    def __str__(self) -> str:
        return f"unix://{self.path}" if self.path else f"tcp://{self.host}:{self.port}"


def address_parse(url: str) -> ClamdAddress:
    """``tcp://127.0.0.1:3310`` or ``unix:///run/clamav/clamd.ctl``; :class:`ClamdUrlInvalid` otherwise."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ClamdUrlInvalid("unix:// needs an absolute socket path (unix:///run/clamav/clamd.ctl)")
        return ClamdAddress(path=path)
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or not port:
            raise ClamdUrlInvalid("tcp:// needs a host and a port (tcp://127.0.0.1:3310)")
        return ClamdAddress(host=parts.hostname, port=port)
    raise ClamdUrlInvalid(f"expected tcp://host:port or unix:///path, got scheme {parts.scheme!r}")


@dataclass(frozen=True)
class ScanResult:
    """One scan: ``verdict`` is clean, infected, error or too_large; ``signature`` when infected."""

    verdict: str
    signature: str = ""
    error: str = ""  # what went wrong, for logs (never shown to senders)
    seconds: float = 0.0

    @property
    def infected(self) -> bool:
        return self.verdict == "infected"

    @property
    def final(self) -> bool:
        """An answer that a rescan would not change (unlike ``error``)."""
        return self.verdict != "error"


def configured() -> bool:
    return bool(settings.CLAMD_URL)


def _frames(content: bytes) -> Iterator[bytes]:
    view = memoryview(content)
    for start in range(0, len(content), CHUNK):
        piece = view[start : start + CHUNK]
        yield struct.pack("!L", len(piece)) + piece
    yield struct.pack("!L", 0)


def reply_parse(raw: bytes) -> ScanResult:
    """clamd's INSTREAM reply (NUL-terminated with the ``z`` prefix) as a result."""
    text = raw.rstrip(b"\0\n").decode("utf-8", "replace").strip()
    if text.endswith(" ERROR"):
        if "size limit exceeded" in text.lower():
            logger.warning("clamd refused a stream as too long: CLAMD_STREAM_MAX_LENGTH exceeds its StreamMaxLength")
            return ScanResult("too_large", error=text)
        return ScanResult("error", error=text[:200])
    _, _, status = text.partition(": ")
    if status == "OK":
        return ScanResult("clean")
    if status.endswith(" FOUND"):
        return ScanResult("infected", signature=status.removesuffix(" FOUND").strip()[:255])
    return ScanResult("error", error=f"unexpected reply {text[:200]!r}")


def _finish(result: ScanResult, started: float, stage: str) -> ScanResult:
    seconds = time.perf_counter() - started
    scans, scan_seconds = metrics()
    scans.labels(stage, result.verdict).inc()
    if result.verdict != "too_large" or result.error:  # a scan that never reached clamd takes no time
        scan_seconds.labels(stage).observe(seconds)
    if result.verdict == "error":
        logger.warning("clamd scan failed (%s): %s", stage, result.error)
    return ScanResult(result.verdict, result.signature, result.error, seconds)


def _limits(url: str | None, timeout: float | None, max_length: int | None) -> tuple[ClamdAddress, float, int]:
    return (
        address_parse(url if url is not None else settings.CLAMD_URL),
        float(timeout if timeout is not None else settings.CLAMD_TIMEOUT),
        int(max_length if max_length is not None else settings.CLAMD_STREAM_MAX_LENGTH),
    )


def _connect(address: ClamdAddress, timeout: float) -> socket.socket:
    if address.path:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address.path)
        except OSError:
            sock.close()
            raise
        return sock
    return socket.create_connection((address.host, address.port), timeout=timeout)


def scan(
    content: bytes,
    *,
    stage: str = "pipeline",
    url: str | None = None,
    timeout: float | None = None,
    max_length: int | None = None,
) -> ScanResult:
    """Scan ``content`` with clamd (blocking); never raises for clamd's sake."""
    started = time.perf_counter()
    address, timeout, max_length = _limits(url, timeout, max_length)
    if len(content) > max_length:
        return _finish(ScanResult("too_large"), started, stage)
    deadline = time.monotonic() + timeout
    try:
        sock = _connect(address, timeout)
    except OSError as exc:
        return _finish(ScanResult("error", error=f"connect to {address}: {type(exc).__name__}"), started, stage)
    with sock:
        try:
            sock.sendall(b"zINSTREAM\0")
            for frame in _frames(content):
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            pass  # clamd stopped reading (its size limit): its reply says why
        except OSError as exc:
            return _finish(ScanResult("error", error=f"send: {type(exc).__name__}"), started, stage)
        reply = b""
        try:
            while not reply.endswith(b"\0") and len(reply) < MAX_REPLY:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(MAX_REPLY)
                if not chunk:
                    break
                reply += chunk
        except OSError as exc:
            return _finish(ScanResult("error", error=f"reply: {type(exc).__name__}"), started, stage)
    if not reply:
        return _finish(ScanResult("error", error="connection closed without a reply"), started, stage)
    return _finish(reply_parse(reply), started, stage)


_executor: ThreadPoolExecutor | None = None


async def scan_async(content: bytes, *, stage: str = "smtp", **options: Any) -> ScanResult:
    """:func:`scan` off the event loop (a small pool of its own): the SMTP server's call.

    A thread rather than asyncio streams: when clamd stops reading at its StreamMaxLength, the
    broken pipe poisons an asyncio reader before the reply that says why can be read.
    """
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=SCAN_THREADS, thread_name_prefix="clamd")
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor, partial(scan, content, stage=stage, **options))


def version(*, url: str | None = None, timeout: float = 3.0) -> str:
    """clamd's VERSION answer (``ClamAV 1.4.6/...``): /readyz's check; raises OSError when down."""
    with _connect(address_parse(url if url is not None else settings.CLAMD_URL), timeout) as sock:
        sock.sendall(b"zVERSION\0")
        reply = b""
        while not reply.endswith(b"\0") and len(reply) < MAX_REPLY:
            chunk = sock.recv(MAX_REPLY)
            if not chunk:
                break
            reply += chunk
    text = reply.rstrip(b"\0").decode("utf-8", "replace").strip()
    if not text.startswith("ClamAV"):
        raise ConnectionError("clamd gave no version")
    return text
