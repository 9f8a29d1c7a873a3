"""The delivery worker's work: claim due recipients, DKIM-sign, hand over by SMTP, record.

Two routes (README "Sending"): a smarthost named by OUTBOUND_URL, or each recipient domain's
MX (RFC 5321 section 5.1: MX records by preference, else the domain's own address), with
STARTTLS whenever the server offers it (opportunistic, RFC 3207; no certificate check, as
every MTA does on port 25). A connection to an MX goes only to an address the SSRF rules of
mailplatform/transport.py allow: the recipient's domain, and so its MX, is the tenant's pick.

Each recipient has its own transaction with its VERP return path, so a DSN names exactly the
recipient it is about. A task claims the due recipients of its message and, up to
OUTBOUND_BATCH, others that are due (SKIP LOCKED, as the webhook tasks claim deliveries), so
a burst of sends costs a few tasks that each sign a message once and hand its recipients
over one SMTP session, kept open in a per-process pool for the next task (RSET when taken
again, closed on error or after OUTBOUND_SMTP_IDLE seconds unused). A claim lasts
OUTBOUND_CLAIM_LEASE seconds: a second worker never sends the recipient too, and the claim of
a worker killed mid-delivery simply runs out and the sweeper hands it to another. Outcomes
are recorded after each message, so what a killed worker had handed over and recorded is
not sent again (a message whose DATA had not been answered, or answered but not yet
recorded, is: RFC 5321 section 6.3 accepts that rare duplicate).
"""

from __future__ import annotations

import logging
import os
import smtplib
import socket
import ssl
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import UUID

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from audit.services import EventSpec, events_record
from mailplatform.transport import Policy, address_allowed
from outbound import dkim as dkim_keys
from outbound.models import DkimKey, OutboundMessage, Recipient, Suppression
from outbound.services import bounce_address, suppression_record
from tenants import crypto
from tenants import dns as tenant_dns

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What one attempt for one recipient came to: ``delivered``, ``deferred`` or ``bounced``."""

    state: str
    response: str
    host: str = ""


@dataclass(frozen=True)
class Smarthost:
    host: str
    port: int
    security: str  # "none", "starttls" or "tls"
    username: str = ""
    password: str = ""


def smarthost_parse(url: str) -> Smarthost:
    """``smtp://``, ``smtp+tls://`` (STARTTLS required) or ``smtps://`` (TLS from the start)."""
    parts = urlsplit(url)
    schemes = {"smtp": ("none", 25), "smtp+tls": ("starttls", 587), "smtps": ("tls", 465)}
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError("OUTBOUND_URL: expected smtp://, smtp+tls:// or smtps://host[:port]")
    security, port = schemes[parts.scheme]
    return Smarthost(
        host=parts.hostname,
        port=parts.port or port,
        security=security,
        username=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
    )


def _reply(code: int, text: bytes | str) -> str:
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return f"{code} {' '.join(text.split())}"[:1000]


def _outcome(code: int, text: bytes | str, host: str) -> Outcome:
    # RFC 5321 section 4.2.1: 2yz done, 4yz try again later, 5yz never again.
    if 200 <= code < 300:
        return Outcome("delivered", _reply(code, text), host)
    return Outcome("bounced" if code >= 500 else "deferred", _reply(code, text), host)


_TLS_CONTEXTS: dict[tuple[bool, str], ssl.SSLContext] = {}
_TLS_LOCK = threading.Lock()


def _tls_context(verify: bool, cafile: str) -> ssl.SSLContext:
    """One context per kind, made once per process and only once a session needs TLS: loading
    the system's CA store costs tens of milliseconds, more than a whole SMTP transaction on
    loopback (the lock keeps a worker's threads starting together from each loading it)."""
    with _TLS_LOCK:
        context = _TLS_CONTEXTS.get((verify, cafile))
        if context is None:
            context = ssl.create_default_context(cafile=cafile or None)
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            _TLS_CONTEXTS[(verify, cafile)] = context
        return context


def _session_open(host: str, address: str, port: int, security: str, *, verify: bool) -> smtplib.SMTP:
    timeout = settings.OUTBOUND_SMTP_TIMEOUT
    helo = settings.SMTP_HOSTNAME
    session: smtplib.SMTP
    if security == "tls":
        context = _tls_context(verify, settings.OUTBOUND_CA_FILE)
        session = smtplib.SMTP_SSL(timeout=timeout, local_hostname=helo, context=context)
        session._host = host  # type: ignore[attr-defined]  # SNI and the certificate's name
    else:
        session = smtplib.SMTP(timeout=timeout, local_hostname=helo)
    session.connect(address, port)
    session._host = host  # type: ignore[attr-defined]
    session.ehlo()
    if security == "starttls" or (security == "opportunistic" and session.has_extn("starttls")):
        session.starttls(context=_tls_context(verify, settings.OUTBOUND_CA_FILE))
        session.ehlo()
    return session


def _transaction(session: smtplib.SMTP, mail_from: str, rcpt: str, content: bytes, host: str) -> Outcome:
    """One MAIL/RCPT/DATA for one recipient (RSET first when the session was used before)."""
    code, text = session.mail(mail_from, ["BODY=8BITMIME"] if session.has_extn("8bitmime") else [])
    if code != 250:
        session.rset()
        return _outcome(code, text, host)
    code, text = session.rcpt(rcpt)
    if code not in (250, 251):
        session.rset()
        return _outcome(code, text, host)
    code, text = session.data(content)
    return _outcome(code, text, host)


def _quit(session: smtplib.SMTP) -> None:
    try:
        session.quit()
    except (smtplib.SMTPException, OSError):
        session.close()


class SessionPool:
    """Open SMTP sessions of this worker process, by where they lead, for the next task.

    A session is given back only after a clean transaction; one taken again is checked with
    RSET (a server that closed it meanwhile costs a new connection, not a deferral); one idle
    longer than OUTBOUND_SMTP_IDLE is closed. A forked child never uses its parent's sockets.
    """

    LIMIT = 32  # idle sessions kept per destination (a worker's threads, at most)

    def __init__(self) -> None:
        self._idle: dict[tuple[Any, ...], list[tuple[smtplib.SMTP, float]]] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _expired(self, now: float) -> list[smtplib.SMTP]:
        """Sessions idle too long, taken out (the lock held)."""
        if self._pid != os.getpid():
            self._idle, self._pid = {}, os.getpid()
        expired: list[smtplib.SMTP] = []
        for sessions in self._idle.values():
            while sessions and now - sessions[0][1] > settings.OUTBOUND_SMTP_IDLE:
                expired.append(sessions.pop(0)[0])
        return expired

    def take(self, key: tuple[Any, ...]) -> smtplib.SMTP | None:
        """An idle session to ``key`` that still answers RSET, or None."""
        while True:
            with self._lock:
                expired = self._expired(time.monotonic())
                sessions = self._idle.get(key)
                session = sessions.pop()[0] if sessions else None
            for stale in expired:
                _quit(stale)
            if session is None:
                return None
            try:
                if session.rset()[0] == 250:
                    return session
            except (smtplib.SMTPException, OSError):
                pass
            session.close()

    def give(self, key: tuple[Any, ...], session: smtplib.SMTP) -> None:
        kept = False
        with self._lock:
            expired = self._expired(time.monotonic())
            sessions = self._idle.setdefault(key, [])
            if len(sessions) < self.LIMIT:
                sessions.append((session, time.monotonic()))
                kept = True
        for stale in expired:
            _quit(stale)
        if not kept:
            _quit(session)

    def clear(self) -> None:
        with self._lock:
            sessions = [session for idle in self._idle.values() for session, _ in idle]
            self._idle = {}
        for session in sessions:
            _quit(session)


POOL = SessionPool()


class SmarthostRoute:
    """Every recipient through OUTBOUND_URL, over one session for the whole task (pooled).

    After a failure to connect or a refusal of the session itself, the rest of the task is
    deferred with the same reason instead of trying again for each message."""

    def __init__(self, smarthost: Smarthost) -> None:
        self.smarthost = smarthost
        self.where = f"{smarthost.host}:{smarthost.port}"
        self.key = ("smarthost", smarthost.host, smarthost.port, smarthost.security, smarthost.username)
        self.session: smtplib.SMTP | None = None
        self.broken: Outcome | None = None

    def _session(self) -> smtplib.SMTP:
        if self.session is None:
            self.session = POOL.take(self.key)
        if self.session is None:
            smarthost = self.smarthost
            addresses = socket.getaddrinfo(smarthost.host, smarthost.port, type=socket.SOCK_STREAM)
            session = _session_open(
                smarthost.host, str(addresses[0][4][0]), smarthost.port, smarthost.security, verify=True
            )
            try:
                if smarthost.username:
                    session.login(smarthost.username, smarthost.password)
            except BaseException:
                session.close()
                raise
            self.session = session
        return self.session

    def _drop(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def deliver(self, batch: list[tuple[Recipient, bytes]]) -> dict[UUID, Outcome]:
        if self.broken is not None:
            return {recipient.pk: self.broken for recipient, _ in batch}
        outcomes: dict[UUID, Outcome] = {}
        where = self.where
        failed: Outcome | None = None
        try:
            session = self._session()
            for recipient, content in batch:
                outcomes[recipient.pk] = _transaction(
                    session, bounce_address(recipient.pk), recipient.address, content, where
                )
        except smtplib.SMTPResponseException as exc:
            reason = _outcome(exc.smtp_code, exc.smtp_error, where)
            failed = Outcome("deferred" if reason.state == "delivered" else reason.state, reason.response, where)
        except (smtplib.SMTPException, OSError, ssl.SSLError) as exc:
            failed = Outcome("deferred", f"{where}: {type(exc).__name__}: {exc}"[:1000], where)
        if failed is not None:
            self._drop()
            if not outcomes:
                self.broken = failed
            for recipient, _ in batch:
                outcomes.setdefault(recipient.pk, failed)
        return outcomes

    def close(self) -> None:
        if self.session is not None:
            POOL.give(self.key, self.session)
            self.session = None


class MxRoute:
    """Each recipient domain's MX, over the pooled sessions of this process (one per MX host
    and address, taken again by the next task as the smarthost's are)."""

    def deliver(self, batch: list[tuple[Recipient, bytes]]) -> dict[UUID, Outcome]:
        by_domain: dict[str, list[tuple[Recipient, bytes]]] = defaultdict(list)
        for recipient, data in batch:
            by_domain[recipient.address.rpartition("@")[2].lower()].append((recipient, data))
        outcomes: dict[UUID, Outcome] = {}
        for domain, group in by_domain.items():
            outcomes.update(_via_mx(domain, group))
        return outcomes

    def close(self) -> None:
        pass


def mx_hosts(domain: str) -> list[str]:
    """The hosts to try for ``domain``: MX by preference, else the domain itself (RFC 5321 5.1).
    A null MX (RFC 7505, ``.``) means the domain takes no mail: an empty list."""
    exchanges = tenant_dns.mx_exchanges(domain)
    if not exchanges:
        return [domain]
    if len(exchanges) == 1 and exchanges[0][1] in ("", "."):
        return []
    return [host for _, host in exchanges if host]


def _via_mx(domain: str, batch: list[tuple[Recipient, bytes]]) -> dict[UUID, Outcome]:
    pending = {recipient.pk: (recipient, content) for recipient, content in batch}
    outcomes: dict[UUID, Outcome] = {}
    try:
        hosts = mx_hosts(domain)
    except tenant_dns.LookupFailed as exc:
        return {pk: Outcome("deferred", f"DNS: {exc}"[:1000]) for pk in pending}
    if not hosts:
        return {pk: Outcome("bounced", f"550 5.1.10 {domain} accepts no mail (null MX, RFC 7505)") for pk in pending}
    policy = Policy.outbound()
    last = "no MX host could be reached"
    port = settings.OUTBOUND_MX_PORT
    for host in hosts:
        try:
            addresses = tenant_dns.host_addresses(host)
        except tenant_dns.LookupFailed as exc:
            last = f"{host}: DNS: {exc}"
            continue
        allowed = [address for address in addresses if address_allowed(address, policy)]
        if not allowed:
            last = f"{host}: no public address ({', '.join(addresses[:3]) or 'none'})"
            continue
        for address in allowed[:2]:
            key = ("mx", host, address, port)
            session: smtplib.SMTP | None = None
            try:
                session = POOL.take(key) or _session_open(host, address, port, "opportunistic", verify=False)
                for pk, (recipient, content) in list(pending.items()):
                    outcome = _transaction(session, bounce_address(pk), recipient.address, content, host)
                    outcomes[pk] = outcome
                    if outcome.state != "deferred":
                        del pending[pk]
                POOL.give(key, session)
            except smtplib.SMTPResponseException as exc:
                if session is not None:
                    session.close()
                last = _outcome(exc.smtp_code, exc.smtp_error, host).response
                if exc.smtp_code >= 500 and exc.smtp_code != 554:
                    continue
            except (smtplib.SMTPException, OSError, ssl.SSLError) as exc:
                if session is not None:
                    session.close()
                last = f"{host}: {type(exc).__name__}: {exc}"
            if not pending:
                return outcomes
    for pk in pending:
        outcomes.setdefault(pk, Outcome("deferred", last[:1000]))
    return outcomes


def _claim(message_ids: list[UUID], now: datetime, along: int) -> list[Recipient]:
    """The due recipients of ``message_ids``, then up to ``along`` other due ones, oldest
    first; rows another worker holds are skipped, never waited for."""
    lease = now + timedelta(seconds=settings.OUTBOUND_CLAIM_LEASE)
    due = Q(state__in=Recipient.PENDING_STATES, next_attempt_at__lte=now) & (
        Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
    )
    with transaction.atomic():
        rows = list(Recipient.objects.select_for_update(skip_locked=True).filter(due, message_id__in=message_ids))
        if along > 0:
            rows += list(
                Recipient.objects.select_for_update(skip_locked=True)
                .filter(due)
                .exclude(message_id__in=message_ids)
                .order_by("next_attempt_at")[:along]
            )
        if rows:
            Recipient.objects.filter(pk__in=[row.pk for row in rows]).update(claimed_until=lease)
    return rows


@lru_cache(maxsize=256)
def _private_key(key_id: UUID, encrypted: str) -> str:
    """A key's private half, decrypted once per process (a key's bytes never change)."""
    return crypto.decrypt(encrypted)


def _active_keys(domain_ids: set[Any]) -> dict[Any, DkimKey]:
    """The signing key of each domain, read once per task (a rotation shows at the next task)."""
    keys = DkimKey.objects.filter(domain_id__in=domain_ids, state=DkimKey.State.ACTIVE).select_related("domain")
    return {key.domain_id: key for key in keys}


def _signed(message: OutboundMessage, key: DkimKey | None) -> tuple[bytes, str]:
    content = bytes(message.content)
    if key is None:
        return content, ""
    signed = dkim_keys.message_sign(
        content,
        domain=key.domain.name,
        selector=key.selector,
        algorithm=key.algorithm,
        private_key=_private_key(key.pk, key.private_key_encrypted),
    )
    return signed, key.selector


_RECORDED_FIELDS = [
    "state",
    "attempts",
    "last_attempt_at",
    "last_response",
    "remote_host",
    "claimed_until",
    "dkim_selector",
    "next_attempt_at",
    "delivered_at",
    "bounced_at",
]


def _record(recipient: Recipient, outcome: Outcome, selector: str, now: datetime) -> EventSpec:
    """Apply one attempt's outcome to ``recipient`` (not saved yet) and describe its event."""
    recipient.attempts += 1
    recipient.last_attempt_at = now
    recipient.last_response = outcome.response
    recipient.remote_host = outcome.host[:255]
    recipient.claimed_until = None
    recipient.dkim_selector = selector
    event_data: dict[str, Any] = {
        "response": outcome.response,
        "attempts": recipient.attempts,
        "remote_host": outcome.host,
    }
    state = outcome.state
    if state == "deferred":
        schedule = settings.OUTBOUND_RETRY_SCHEDULE or [300]
        next_at = now + timedelta(seconds=schedule[min(recipient.attempts - 1, len(schedule) - 1)])
        if next_at > recipient.give_up_at:
            state = "bounced"
            recipient.last_response = f"gave up after {recipient.attempts} attempts: {outcome.response}"[:1000]
            event_data["response"] = recipient.last_response
        else:
            recipient.state = Recipient.State.DEFERRED
            recipient.next_attempt_at = next_at
            event_data["next_attempt_at"] = next_at.isoformat()
    if state == "delivered":
        recipient.state, recipient.delivered_at = Recipient.State.DELIVERED, now
    elif state == "bounced":
        recipient.state, recipient.bounced_at = Recipient.State.BOUNCED, now
        if outcome.response.startswith("5"):
            suppression_record(
                tenant_id=recipient.tenant_id,
                address=recipient.address,
                reason=Suppression.Reason.HARD_BOUNCE,
                detail=outcome.response,
            )
    return EventSpec(
        tenant_id=recipient.tenant_id,
        type=f"outbound.{recipient.state}",
        data={"outbound_id": str(recipient.message_id), "recipient": recipient.address, **event_data},
        trace_id=str(recipient.message_id),
    )


def _outcomes_record(recipients: list[Recipient], outcomes: dict[UUID, Outcome], selector: str) -> None:
    """One message's outcomes and their events, in one transaction.

    Committed without waiting for the WAL flush (``synchronous_commit = off``): a worker
    killed after this keeps it (PostgreSQL has it), and only a crash of PostgreSQL itself in
    the next fraction of a second could forget it, which sends the message once more (the
    rare duplicate RFC 5321 section 6.3 accepts), never loses it."""
    finished = timezone.now()
    with transaction.atomic():
        if connection.vendor == "postgresql":  # SQLite has no such setting (nor the statement)
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
        specs = [
            _record(
                recipient, outcomes.get(recipient.pk) or Outcome("deferred", "no attempt was made"), selector, finished
            )
            for recipient in recipients
        ]
        _recipients_update(recipients)
        events_record(specs)


def _recipients_update(recipients: list[Recipient]) -> None:
    """Save the recorded fields with one plain UPDATE per set of equal values: the
    recipients of one message mostly come to the same outcome, and bulk_update's CASE
    expression of every field costs more CPU than the statement it saves."""
    groups: dict[tuple[Any, ...], list[Any]] = defaultdict(list)
    for recipient in recipients:
        groups[tuple(getattr(recipient, name) for name in _RECORDED_FIELDS)].append(recipient.pk)
    for values, pks in groups.items():
        Recipient.objects.filter(pk__in=pks).update(**dict(zip(_RECORDED_FIELDS, values, strict=True)))


def message_deliver(message_id: UUID, along: int = 0) -> dict[str, int]:
    """Deliver every due recipient of one message, and up to ``along`` other due recipients."""
    return messages_deliver([message_id], along=along)


def messages_deliver(message_ids: list[UUID], along: int = 0) -> dict[str, int]:
    """Deliver every due recipient of the given messages, and up to ``along`` other due
    recipients; counts by outcome. Safe to run twice: only claimed recipients are sent, and a
    claim is taken once."""
    now = timezone.now()
    claimed = _claim(message_ids, now, along)
    if not claimed:
        return {}
    by_message: dict[UUID, list[Recipient]] = defaultdict(list)
    for recipient in claimed:
        by_message[recipient.message_id].append(recipient)
    messages = OutboundMessage.objects.in_bulk(list(by_message))
    keys = _active_keys({message.domain_id for message in messages.values()})
    route: SmarthostRoute | MxRoute = (
        SmarthostRoute(smarthost_parse(settings.OUTBOUND_URL)) if settings.OUTBOUND_URL else MxRoute()
    )
    counts: dict[str, int] = defaultdict(int)
    try:
        for pk, recipients in by_message.items():
            message = messages.get(pk)
            if message is None:  # deleted with its tenant meanwhile
                continue
            content, selector = _signed(message, keys.get(message.domain_id))
            outcomes = route.deliver([(recipient, content) for recipient in recipients])
            _outcomes_record(recipients, outcomes, selector)
            for recipient in recipients:
                counts[str(recipient.state)] += 1
    finally:
        route.close()
    logger.info("outbound %s: %s", ",".join(str(pk) for pk in message_ids), dict(counts))
    return dict(counts)


def recipients_due(limit: int = 1000) -> list[str]:
    """Messages with a recipient due and not claimed (or whose claim ran out)."""
    now = timezone.now()
    rows = (
        Recipient.objects.filter(state__in=Recipient.PENDING_STATES, next_attempt_at__lte=now)
        .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lt=now))
        .values_list("message_id", flat=True)
        .distinct()[:limit]
    )
    return [str(pk) for pk in rows]
