"""The SMTP and LMTP protocol: aiosmtpd, with the DATA phase and the failure paths replaced.

What differs from stock aiosmtpd, and why:

- DATA is read in bulk up to ``<CRLF>.<CRLF>`` (RFC 5321 section 4.1.1.4) instead of line by
  line, then un-dot-stuffed (section 4.5.2). Only CRLF.CRLF ends the data: a bare LF never
  does, which is what keeps SMTP smuggling out. Long lines, bare LFs, 8-bit and NUL bytes are
  stored as received; nothing is rewritten.
- The reply to DATA is sent only once the spool entry is durable (:mod:`ingest.spool`).
- Every exception answers ``451 4.3.0`` (RFC 3463): aiosmtpd's ``500 Error: (...)`` would
  both bounce the mail permanently and leak internals.
- Limits: connections per IP (``421 4.7.0``), rates (``451 4.7.1``), SIZE (RFC 1870,
  ``552 5.3.4``), recipients (``452 4.5.3``, RFC 5321 section 4.5.3.1.8), spool space
  (``452 4.3.1``), a per-command timeout and a total deadline (``421 4.4.2``, section 4.5.3.2).
- LMTP (RFC 2033): LHLO, and after DATA one reply per accepted recipient (section 4.2).
- PROXY protocol: the header is read, and believed, only from SMTP_TRUSTED_PROXIES; any other
  peer is disconnected before the greeting (HAProxy's PROXY protocol spec, section 2: a
  receiver that expects the header never guesses, and never trusts it from just anyone).
- Shutdown: the handler tracks its live sessions. Idle ones (between commands) are told
  ``421 4.3.2`` (RFC 5321 section 3.8) at once; one in the middle of DATA finishes, gets its
  reply, then the 421, within the grace period.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from ingest import metrics
from ingest.directory import Decision, RecipientDirectory
from ingest.limits import ConnectionCounter, RateLimiter
from ingest.spool import Envelope as SpoolEnvelope
from ingest.spool import Recipient, SpoolWriter, is_disk_full, queue_id_new
from mailboxes import authentication
from mailplatform import clamd
from mailplatform.clientip import rate_limit_subject

logger = logging.getLogger(__name__)

TEMPORARY_FAILURE = "451 4.3.0 Temporary failure, please try again later"
SPOOL_FULL = "452 4.3.1 Insufficient system storage, try again later"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
RATE_LIMITED = "451 4.7.1 Too much mail, slow down and try again later"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address, try again later"
TIMED_OUT = "421 4.4.2 Timeout, closing connection"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
# Antivirus in reject mode (RFC 3463: 5.7.1 delivery not authorized, 5.3.4 too big for the
# system, 4.3.0 a temporary system failure).
SCANNER_UNAVAILABLE = "451 4.3.0 Virus scanner unavailable, try again later"
TOO_BIG_TO_SCAN = "552 5.3.4 Message too large to be scanned for viruses"
TERMINATOR = b"\r\n.\r\n"
# The DMARC check at DATA (a domain's dmarc_reject) as a whole: SPF, DKIM and DMARC look-ups.
DMARC_CHECK_TIMEOUT = 20.0


@dataclass
class Limits:
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    connections_per_ip: int = 0
    rate_per_ip: int = 0
    rate_per_tenant: int = 0
    command_timeout: float = 300.0
    connection_deadline: float = 1800.0
    spool_low_water: int = 0


class IngestEnvelope(Envelope):
    """aiosmtpd's envelope plus the RCPT decisions, in the order they were accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.decisions: list[tuple[str, Decision]] = []
        self.tenants_charged: set[str] = set()


class IngestHandler:
    """The policy behind the protocol: directory, limits and the spool (shared by sessions)."""

    def __init__(
        self,
        *,
        directory: RecipientDirectory,
        writer: SpoolWriter,
        limits: Limits,
        hostname: str,
        source: str = "smtp",
        trusted_proxies: Iterable[str] = (),
        clamd_url: str | None = None,
        antivirus_fail_open: bool | None = None,
    ) -> None:
        from django.conf import settings

        self.directory = directory
        # Reject mode scans before the 250; the settings unless a test says otherwise.
        self.clamd_url = settings.CLAMD_URL if clamd_url is None else clamd_url
        self.antivirus_fail_open = settings.ANTIVIRUS_FAIL_OPEN if antivirus_fail_open is None else antivirus_fail_open
        self.writer = writer
        self.limits = limits
        self.hostname = hostname
        self.source = source
        self.connections = ConnectionCounter(limits.connections_per_ip)
        self.ip_rate = RateLimiter(limits.rate_per_ip)
        self.tenant_rate = RateLimiter(limits.rate_per_tenant)
        self.trusted_proxies = [ipaddress.ip_network(network, strict=False) for network in trusted_proxies]
        self.sessions: set[IngestSMTP] = set()
        self.shutting_down = False

    def proxy_trusted(self, peer_ip: str) -> bool:
        """Whether a PROXY header from ``peer_ip`` (the socket's peer) may be believed."""
        try:
            address = ipaddress.ip_address(peer_ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted_proxies)

    async def sessions_close(self, grace: float) -> None:
        """Shut down gracefully: 421 to idle sessions now, DATA transactions get ``grace`` seconds.

        The listening socket must already be closed. On Python 3.11 ``Server.wait_closed()``
        returns at once after ``close()``, so the sessions are tracked here instead.
        """
        self.shutting_down = True
        for session in list(self.sessions):
            if not session.in_data:
                session.say_and_close(SHUTTING_DOWN)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(session.in_data for session in self.sessions) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for session in list(self.sessions):  # past the grace: a transaction never acknowledged
            if session.in_data:
                logger.warning("shutdown grace over: closing a session in the middle of DATA")
            session.say_and_close(SHUTTING_DOWN)
        closing = loop.time() + 1.0
        while self.sessions and loop.time() < closing:
            await asyncio.sleep(0.02)

    def advertised_size(self) -> int:
        return self.directory.max_message_size(self.limits.max_message_size)

    def spool_low(self) -> bool:
        if not self.limits.spool_low_water:
            return False
        try:
            free = self.writer.spool.free_bytes()
        except OSError:
            return True
        metrics.SPOOL_FREE_BYTES.set(free)
        return free < self.limits.spool_low_water

    # aiosmtpd hooks -------------------------------------------------------------------
    async def handle_exception(self, error: Exception) -> str:
        logger.error("smtp session error: %s", type(error).__name__, exc_info=error)
        return TEMPORARY_FAILURE

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str) -> str:
        session.host_name = hostname
        return f"250 {self.hostname}"

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # RFC 1870 SIZE, RFC 2920 PIPELINING (aiosmtpd reads commands from a buffered stream,
        # so pipelined commands already work), RFC 2034 enhanced status codes.
        extra = [f"250-SIZE {self.advertised_size()}", "250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        return [responses[0], *extra, *responses[1:]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.spool_low():
            metrics.LIMITED.labels("spool_space").inc()
            return SPOOL_FULL
        for option in options:
            name, _, value = option.partition("=")
            if name == "SIZE" and value.isdigit() and int(value) > self.advertised_size():
                metrics.LIMITED.labels("size").inc()
                return TOO_BIG
        if not self.ip_rate.allow(rate_limit_subject(session_ip(session))):
            metrics.LIMITED.labels("rate_ip").inc()
            return RATE_LIMITED
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        assert isinstance(envelope, IngestEnvelope)
        if len(envelope.decisions) >= self.limits.max_recipients:
            metrics.LIMITED.labels("recipients").inc()
            return TOO_MANY_RECIPIENTS
        if self.spool_low():
            metrics.LIMITED.labels("spool_space").inc()
            return SPOOL_FULL
        decision = await self.directory.decide_checked(address)  # a refusal is confirmed by the database
        if not decision.accepted:
            return str(decision.reply)
        tenant = decision.tenant_id or ""
        if tenant not in envelope.tenants_charged:
            if not self.tenant_rate.allow(tenant):
                metrics.LIMITED.labels("rate_tenant").inc()
                return RATE_LIMITED
            envelope.tenants_charged.add(tenant)
        declared = _declared_size(envelope.mail_options)
        if declared is not None and decision.max_message_size is not None and declared > decision.max_message_size:
            metrics.LIMITED.labels("size").inc()
            return TOO_BIG
        envelope.decisions.append((address, decision))
        envelope.rcpt_tos.append(address)
        return str(decision.reply)

    # the DATA outcome -------------------------------------------------------------------
    def envelope_for(self, session: Session, envelope: IngestEnvelope, size: int, tls: bool) -> SpoolEnvelope | None:
        """The spool envelope for the recipients that fit; None if every one is dropped."""
        recipients = [
            Recipient(
                address=address,
                mailbox_id=decision.mailbox_id,
                tenant_id=decision.tenant_id,
                tags=list(decision.tags),
            )
            for address, decision in envelope.decisions
            if not decision.drop and decision.mailbox_id and decision.tenant_id and _fits(decision, size)
        ]
        if not recipients:
            return None
        mail_from = envelope.mail_from or ""
        return SpoolEnvelope(
            queue_id=queue_id_new(),
            mail_from="" if mail_from == "<>" else mail_from,
            recipients=recipients,
            remote_ip=session_ip(session),
            helo=(session.host_name or "")[:255],
            tls=tls,
            received_at=time.time(),
            source=self.source,
        )


def _declared_size(options: list[str]) -> int | None:
    for option in options:
        name, _, value = option.partition("=")
        if name == "SIZE" and value.isdigit():
            return int(value)
    return None


def _fits(decision: Decision, size: int) -> bool:
    return decision.max_message_size is None or size <= decision.max_message_size


def session_ip(session: Session) -> str:
    proxy = getattr(session, "proxy_data", None)
    if proxy is not None and getattr(proxy, "src_addr", None):
        return str(proxy.src_addr)
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


class IngestSMTP(SMTP):
    """One SMTP session. A new instance per connection (asyncio protocol factory)."""

    protocol_name = "smtp"
    per_recipient_replies = False

    def __init__(self, handler: IngestHandler, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", handler.limits.command_timeout)
        kwargs.setdefault("hostname", handler.hostname)
        kwargs.setdefault("ident", "mailplatform ESMTP")
        # SIZE is advertised and enforced by the handler with enhanced codes (RFC 1870).
        super().__init__(handler, data_size_limit=None, **kwargs)
        self.ingest = handler
        self._counted_ip: str | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._command = "CONNECT"
        self.in_data = False  # from the DATA command to its reply: shutdown waits for it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.ingest.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.ingest.sessions.discard(self)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        # The client closed its side: aiosmtpd cancels the session's task, whose handler closes
        # the socket, but a task cancelled before it ever ran (the peer left before the
        # greeting: a port probe) closed nothing, and the socket stayed open, counted as a
        # session, until the command timeout. False: the transport closes itself.
        super().eof_received()
        return False

    def _create_envelope(self) -> Envelope:
        return IngestEnvelope()

    async def push(self, status: Any) -> None:
        text = status if isinstance(status, str) else bytes(status).decode("ascii", "replace")
        metrics.REPLIES.labels(self._command, text[:3]).inc()
        await super().push(status)

    def say_and_close(self, reply: str) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(reply.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
            metrics.REPLIES.labels(self._command, reply[:3]).inc()
            transport.close()

    def _timeout_cb(self) -> None:
        # RFC 5321 section 4.5.3.2: the server may close an idle session; say so with 421.
        metrics.LIMITED.labels("command_timeout").inc()
        self.say_and_close(TIMED_OUT)

    def _deadline_cb(self) -> None:
        metrics.LIMITED.labels("connection_deadline").inc()
        self.say_and_close(TIMED_OUT)

    async def _handle_client(self) -> None:
        assert self.session is not None
        if self.ingest.shutting_down:  # accepted just before the listening socket closed
            self.say_and_close(SHUTTING_DOWN)
            return
        if self._proxy_timeout is not None:
            # PROXY protocol v1/v2 from a trusted balancer: the real client address comes
            # first, before the greeting (aiosmtpd parses it; we check limits after it).
            # From any other peer the header would be a forged client address: no greeting.
            peer = self.session.peer
            if not self.ingest.proxy_trusted(str(peer[0]) if isinstance(peer, tuple) and peer else ""):
                metrics.CONNECTIONS_REFUSED.labels("proxy_untrusted").inc()
                logger.debug("PROXY protocol from an untrusted peer: disconnected")
                assert self.transport is not None
                self.transport.close()
                return
            self._reset_timeout(self._proxy_timeout)
            proxy = await get_proxy(self._reader)
            if not proxy or not proxy.valid:
                metrics.CONNECTIONS_REFUSED.labels("proxy").inc()
                assert self.transport is not None
                self.transport.close()
                return
            self.session.proxy_data = proxy
            self._proxy_timeout = None
            self._reset_timeout()
        ip = rate_limit_subject(session_ip(self.session))  # an IPv6 client counts by its /64
        if not self.ingest.connections.open(ip):
            metrics.CONNECTIONS_REFUSED.labels("per_ip").inc()
            metrics.LIMITED.labels("connections_ip").inc()
            await self.push(TOO_MANY_CONNECTIONS)
            assert self.transport is not None
            self.transport.close()
            return
        self._counted_ip = ip
        metrics.CONNECTIONS.labels(self.protocol_name).inc()
        self._deadline = self.loop.call_later(self.ingest.limits.connection_deadline, self._deadline_cb)
        try:
            await super()._handle_client()
        finally:
            self.ingest.connections.close(ip)
            self._counted_ip = None
            self._deadline.cancel()

    # Commands: aiosmtpd's, with the command name recorded for the reply metrics.
    async def smtp_HELO(self, hostname: str) -> None:
        self._command = "HELO"
        await super().smtp_HELO(hostname)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._command = "EHLO"
        await super().smtp_EHLO(hostname)

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._command = "MAIL"
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self._command = "RCPT"
        await super().smtp_RCPT(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        self._command = "DATA"
        if await self.check_helo_needed():
            return
        envelope = self.envelope
        assert isinstance(envelope, IngestEnvelope)
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        self.in_data = True
        try:
            await self._data_transaction(envelope)
        finally:
            self.in_data = False
        if self.ingest.shutting_down:
            # RFC 5321 section 3.8: the transaction is answered; now say why we close.
            self.say_and_close(SHUTTING_DOWN)

    async def _data_transaction(self, envelope: IngestEnvelope) -> None:
        """354, the data, the spool, the reply(ies)."""
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = self.ingest.advertised_size()
        try:
            content = await self._read_data(limit)
        except (asyncio.IncompleteReadError, ConnectionError):
            self._set_post_data_state()
            raise ConnectionResetError("connection lost during DATA") from None
        except Exception as exc:
            # Mid-message the stream cannot be resynchronised: answer, then hang up.
            logger.error("DATA read failed: %s", type(exc).__name__, exc_info=exc)
            self._set_post_data_state()
            self.say_and_close(TEMPORARY_FAILURE)
            return
        self._reset_timeout()
        if content is None:
            metrics.LIMITED.labels("size").inc()
            self._set_post_data_state()
            await self._reply_data(envelope, [TOO_BIG] * len(envelope.decisions))
            return
        replies = await self._deliver(envelope, content)
        self._set_post_data_state()
        await self._reply_data(envelope, replies)

    async def _reply_data(self, envelope: IngestEnvelope, replies: list[str]) -> None:
        """SMTP: one reply for the transaction (the first is representative)."""
        await self.push(replies[0] if replies else TEMPORARY_FAILURE)

    async def _deliver(self, envelope: IngestEnvelope, content: bytes) -> list[str]:
        """Spool the message; one reply per accepted recipient, in RCPT order."""
        assert self.session is not None
        started = time.perf_counter()
        size = len(content)
        tls = self._tls_protocol is not None
        spool_envelope = self.ingest.envelope_for(self.session, envelope, size, tls)
        too_big = [not _fits(decision, size) for _, decision in envelope.decisions]
        if any(too_big) and not self.per_recipient_replies:
            # SMTP has a single reply for all recipients: refuse the whole message rather
            # than deliver to some while the sender is told it failed.
            return [TOO_BIG for _ in envelope.decisions]
        if spool_envelope is None:
            # Every recipient is either dropped on purpose or over its tenant's size.
            return [TOO_BIG if big else "250 2.0.0 Ok" for big in too_big]
        dmarc_refusal = await self._dmarc_screen(envelope, spool_envelope, content)
        if dmarc_refusal:
            return [dmarc_refusal for _ in envelope.decisions]
        refusals = await self._antivirus_screen(envelope, spool_envelope, content)
        if refusals and (not self.per_recipient_replies or not spool_envelope.recipients):
            return [refusals.get(index, "250 2.0.0 Ok") for index in range(len(envelope.decisions))]
        try:
            await self.ingest.writer.store(spool_envelope, content)
        except Exception as exc:
            failure = SPOOL_FULL if is_disk_full(exc) else TEMPORARY_FAILURE
            logger.error("spool write failed: %s", exc, extra={"queue_id": spool_envelope.queue_id})
            return [failure for _ in envelope.decisions]
        metrics.DURABLE_SECONDS.observe(time.perf_counter() - started)
        metrics.MESSAGES.labels(self.ingest.source).inc()
        metrics.BYTES.labels(self.ingest.source).inc(size)
        logger.info(
            "queued %s: %d bytes for %d recipients",
            spool_envelope.queue_id,
            size,
            len(spool_envelope.recipients),
            extra={"trace_id": spool_envelope.queue_id, "queue_id": spool_envelope.queue_id},
        )
        ok = f"250 2.0.0 Ok: queued as {spool_envelope.queue_id}"
        return [refusals.get(index) or (TOO_BIG if big else ok) for index, big in enumerate(too_big)]

    async def _dmarc_screen(
        self, envelope: IngestEnvelope, spool_envelope: SpoolEnvelope, content: bytes
    ) -> str | None:
        """A domain's ``dmarc_reject``: DMARC checked before the 250; the refusal, or None.

        ``550 5.7.1`` for a definite DMARC fail under the From domain's ``p=reject`` (RFC 7489
        section 6.6.4, pct=100); ``451 4.7.0`` when a DNS failure (or a check over
        DMARC_CHECK_TIMEOUT) leaves it unknown: never a refusal from a look-up that did not
        answer. SMTP only (one reply, so one recipient asking for it refuses the transaction;
        the domain owner asked for exactly that). LMTP has no connecting IP of the original
        sender, so nothing there could be concluded (mailboxes/authentication.py).
        """
        if self.per_recipient_replies or not any(
            decision.dmarc_reject and decision.mailbox_id and not decision.drop for _, decision in envelope.decisions
        ):
            return None
        sender = authentication.Envelope(
            spool_envelope.source, spool_envelope.remote_ip, spool_envelope.helo, spool_envelope.mail_from
        )
        try:
            outcome = await asyncio.wait_for(
                asyncio.to_thread(authentication.dmarc_refusal, content, sender), timeout=DMARC_CHECK_TIMEOUT
            )
        except Exception as exc:  # too slow, or the libraries tripped: defer, never refuse
            logger.warning("DMARC check at DATA failed: %s", type(exc).__name__)
            metrics.LIMITED.labels("dmarc_unknown").inc()
            return authentication.DMARC_UNKNOWN
        if outcome.reply:
            refused = outcome.reply.startswith("5")
            metrics.LIMITED.labels("dmarc_reject" if refused else "dmarc_unknown").inc()
            logger.info(
                "%s %s: DMARC %s for %s",
                "refused" if refused else "deferred",
                spool_envelope.queue_id,
                outcome.verdict["dmarc"]["result"],
                outcome.verdict["dmarc"]["domain"],
                extra={"trace_id": spool_envelope.queue_id, "queue_id": spool_envelope.queue_id},
            )
        return outcome.reply

    async def _antivirus_screen(
        self, envelope: IngestEnvelope, spool_envelope: SpoolEnvelope, content: bytes
    ) -> dict[int, str]:
        """Reject mode: scan before the 250; refusals by recipient (RCPT order), empty if none.

        Only recipients whose domain (or tenant) is in ``reject`` mode make the message wait
        for clamd. Infected: ``554 5.7.1``, never stored. Over the scanner's limit: ``552
        5.3.4`` (it cannot be scanned before acceptance, so it is not accepted). clamd
        unavailable: ``451 4.3.0`` (fail closed), or with ANTIVIRUS_FAIL_OPEN accepted with
        the verdict ``error``, for the pipeline and the rescan sweeper to scan again. SMTP has
        one reply, so one reject-mode recipient refuses the whole transaction; LMTP refuses
        those recipients alone (RFC 2033 section 4.2) and delivers to the others, with the
        verdict carried in the spool envelope so the message is not scanned twice.
        """
        strict = {
            decision.mailbox_id
            for _, decision in envelope.decisions
            if decision.antivirus_mode == "reject" and decision.mailbox_id and not decision.drop
        }
        if not self.ingest.clamd_url or not any(r.mailbox_id in strict for r in spool_envelope.recipients):
            return {}
        result = await clamd.scan_async(content, stage="smtp", url=self.ingest.clamd_url)
        if result.verdict == "clean":
            spool_envelope.antivirus = {"verdict": "clean", "scanned_at": time.time()}
            return {}
        if result.verdict == "error" and self.ingest.antivirus_fail_open:
            spool_envelope.antivirus = {"verdict": "error", "scanned_at": time.time()}
            return {}
        if result.infected:
            signature = "".join(ch for ch in result.signature if 32 < ord(ch) < 127)[:100]
            refusal = f"554 5.7.1 Message refused: virus found ({signature})"
            metrics.LIMITED.labels("antivirus_infected").inc()
        elif result.verdict == "too_large":
            refusal = TOO_BIG_TO_SCAN
            metrics.LIMITED.labels("antivirus_too_large").inc()
        else:
            refusal = SCANNER_UNAVAILABLE
            metrics.LIMITED.labels("antivirus_unavailable").inc()
        logger.info(
            "refused %s: antivirus %s %s",
            spool_envelope.queue_id,
            result.verdict,
            result.signature,
            extra={"trace_id": spool_envelope.queue_id, "queue_id": spool_envelope.queue_id},
        )
        if not self.per_recipient_replies:
            return dict.fromkeys(range(len(envelope.decisions)), refusal)
        # LMTP: the strict recipients are refused; the others take the message and its verdict.
        spool_envelope.recipients = [r for r in spool_envelope.recipients if r.mailbox_id not in strict]
        if result.verdict != "error":
            spool_envelope.antivirus = {
                "verdict": result.verdict,
                "signature": result.signature,
                "scanned_at": time.time(),
            }
        return {
            index: refusal
            for index, (_, decision) in enumerate(envelope.decisions)
            if decision.mailbox_id in strict and not decision.drop
        }

    async def _read_data(self, limit: int) -> bytes | None:
        """The message up to CRLF.CRLF, un-dot-stuffed; None if it is larger than ``limit``.

        Reads straight from the StreamReader's buffer with ``readuntil`` and a raised limit,
        so a 100 KiB message costs a few calls instead of a couple of thousand (the stream's
        ``_buffer``/``_limit`` are the same internals aiosmtpd itself relies on).
        """
        reader: Any = self._reader
        buffer: bytearray = reader._buffer
        # The CRLF ending the DATA command line is the first CRLF of CRLF.CRLF, so the data
        # may be empty: "." on the very first line (RFC 5321 section 4.1.1.4).
        while len(buffer) < 3:
            if reader.at_eof():
                raise asyncio.IncompleteReadError(bytes(buffer), 3)
            await reader._wait_for_data("readuntil")
        if buffer[:3] == b".\r\n":
            del buffer[:3]
            reader._maybe_resume_transport()
            return b""
        saved_limit = reader._limit
        reader._limit = limit + len(TERMINATOR) + 1
        too_big = False
        try:
            while True:
                try:
                    data = await reader.readuntil(TERMINATOR)
                    break
                except asyncio.LimitOverrunError as exc:
                    # Over SIZE: keep reading to the end of the data, but keep none of it
                    # (RFC 5321 section 4.2.5: reply after the data, not in the middle).
                    too_big = True
                    await reader.read(exc.consumed)
        finally:
            reader._limit = saved_limit
        if too_big:
            return None
        content = data[: -len(TERMINATOR) + 2]  # keep the last line's CRLF
        # RFC 5321 section 4.5.2: drop the first "." of every line that starts with one.
        if content.startswith(b"."):
            content = content[1:]
        if b"\r\n." in content:
            content = content.replace(b"\r\n.", b"\r\n")
        if len(content) > limit:
            return None
        return content


class IngestLMTP(IngestSMTP):
    """LMTP (RFC 2033): LHLO instead of HELO/EHLO, one DATA reply per recipient."""

    protocol_name = "lmtp"
    per_recipient_replies = True

    @syntax("LHLO hostname")
    async def smtp_LHLO(self, arg: str) -> None:
        self._command = "LHLO"
        await SMTP.smtp_EHLO(self, arg)

    async def smtp_HELO(self, hostname: str) -> None:
        self._command = "HELO"
        await self.push('500 5.5.1 Error: command "HELO" not recognized, use LHLO')

    async def smtp_EHLO(self, hostname: str) -> None:
        self._command = "EHLO"
        await self.push('500 5.5.1 Error: command "EHLO" not recognized, use LHLO')

    async def _reply_data(self, envelope: IngestEnvelope, replies: list[str]) -> None:
        # RFC 2033 section 4.2: after the final ".", one reply for each successful RCPT, in
        # order; they go out together so a pipelining client reads them in one go.
        for reply in replies:
            await self.push(reply)
