"""The delivery worker's work: claim due recipients, DKIM-sign, hand over by SMTP, record.

Two routes (README "Sending"): a smarthost named by OUTBOUND_URL, or each recipient domain's
MX (RFC 5321 section 5.1: MX records by preference, else the domain's own address), with
STARTTLS whenever the server offers it (opportunistic, RFC 3207; no certificate check, as
every MTA does on port 25). A connection to an MX goes only to an address the SSRF rules of
mailplatform/transport.py allow: the recipient's domain, and so its MX, is the tenant's pick.

Each recipient has its own transaction with its VERP return path, so a DSN names exactly the
recipient it is about. A recipient is claimed for OUTBOUND_CLAIM_LEASE seconds with a
conditional UPDATE: a second worker never sends it too, and the claim of a worker killed
mid-delivery simply runs out and the sweeper hands it to another (a message whose DATA
had not been answered is sent again then: RFC 5321 section 6.3 accepts that rare duplicate).
"""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import unquote, urlsplit
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from mailplatform.transport import Policy, address_allowed
from outbound import dkim as dkim_keys
from outbound.models import OutboundMessage, Recipient, Suppression
from outbound.services import bounce_address, dkim_key_active, event_outbound, suppression_record
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


def _session_open(host: str, address: str, port: int, security: str, *, verify: bool) -> smtplib.SMTP:
    timeout = settings.OUTBOUND_SMTP_TIMEOUT
    helo = settings.SMTP_HOSTNAME
    context = ssl.create_default_context(cafile=settings.OUTBOUND_CA_FILE or None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    session: smtplib.SMTP
    if security == "tls":
        session = smtplib.SMTP_SSL(timeout=timeout, local_hostname=helo, context=context)
        session._host = host  # type: ignore[attr-defined]  # SNI and the certificate's name
    else:
        session = smtplib.SMTP(timeout=timeout, local_hostname=helo)
    session.connect(address, port)
    session._host = host  # type: ignore[attr-defined]
    session.ehlo()
    if security == "starttls" or (security == "opportunistic" and session.has_extn("starttls")):
        session.starttls(context=context)
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


@contextmanager
def _closing(session: smtplib.SMTP) -> Iterator[smtplib.SMTP]:
    try:
        yield session
    finally:
        try:
            session.quit()
        except (smtplib.SMTPException, OSError):
            session.close()


def _via_smarthost(smarthost: Smarthost, batch: list[tuple[Recipient, bytes]]) -> dict[UUID, Outcome]:
    outcomes: dict[UUID, Outcome] = {}
    where = f"{smarthost.host}:{smarthost.port}"
    try:
        addresses = socket.getaddrinfo(smarthost.host, smarthost.port, type=socket.SOCK_STREAM)
        session = _session_open(
            smarthost.host, str(addresses[0][4][0]), smarthost.port, smarthost.security, verify=True
        )
        with _closing(session):
            if smarthost.username:
                session.login(smarthost.username, smarthost.password)
            for recipient, content in batch:
                outcomes[recipient.pk] = _transaction(
                    session, bounce_address(recipient.pk), recipient.address, content, where
                )
    except smtplib.SMTPResponseException as exc:
        reason = _outcome(exc.smtp_code, exc.smtp_error, where)
        for recipient, _ in batch:
            outcomes.setdefault(
                recipient.pk,
                Outcome("deferred" if reason.state == "delivered" else reason.state, reason.response, where),
            )
    except (smtplib.SMTPException, OSError, ssl.SSLError) as exc:
        for recipient, _ in batch:
            outcomes.setdefault(
                recipient.pk, Outcome("deferred", f"{where}: {type(exc).__name__}: {exc}"[:1000], where)
            )
    return outcomes


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
            try:
                session = _session_open(host, address, port, "opportunistic", verify=False)
                with _closing(session):
                    for pk, (recipient, content) in list(pending.items()):
                        outcome = _transaction(session, bounce_address(pk), recipient.address, content, host)
                        outcomes[pk] = outcome
                        if outcome.state != "deferred":
                            del pending[pk]
            except smtplib.SMTPResponseException as exc:
                last = _outcome(exc.smtp_code, exc.smtp_error, host).response
                if exc.smtp_code >= 500 and exc.smtp_code != 554:
                    continue
            except (smtplib.SMTPException, OSError, ssl.SSLError) as exc:
                last = f"{host}: {type(exc).__name__}: {exc}"
            if not pending:
                return outcomes
    for pk in pending:
        outcomes.setdefault(pk, Outcome("deferred", last[:1000]))
    return outcomes


def _claim(message_id: UUID, now: datetime) -> list[Recipient]:
    lease = now + timedelta(seconds=settings.OUTBOUND_CLAIM_LEASE)
    due = Q(message_id=message_id, state__in=Recipient.PENDING_STATES, next_attempt_at__lte=now) & (
        Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
    )
    with transaction.atomic():
        rows = list(Recipient.objects.select_for_update(skip_locked=True).filter(due))
        if rows:
            Recipient.objects.filter(pk__in=[row.pk for row in rows]).update(claimed_until=lease)
    return rows


def _signed(message: OutboundMessage) -> tuple[bytes, str]:
    content = bytes(message.content)
    key = dkim_key_active(message.domain_id)
    if key is None:
        return content, ""
    signed = dkim_keys.message_sign(
        content,
        domain=key.domain.name,
        selector=key.selector,
        algorithm=key.algorithm,
        private_key=crypto.decrypt(key.private_key_encrypted),
    )
    return signed, key.selector


def _record(recipient: Recipient, outcome: Outcome, selector: str, now: datetime) -> None:
    recipient.attempts += 1
    recipient.last_attempt_at = now
    recipient.last_response = outcome.response
    recipient.remote_host = outcome.host[:255]
    recipient.claimed_until = None
    recipient.dkim_selector = selector
    event_data = {"response": outcome.response, "attempts": recipient.attempts, "remote_host": outcome.host}
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
    recipient.save(
        update_fields=[
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
    )
    event_outbound(recipient, f"outbound.{recipient.state}", event_data)


def message_deliver(message_id: UUID) -> dict[str, int]:
    """Deliver every due recipient of one message; counts by outcome. Safe to run twice:
    only claimed recipients are sent, and a claim is taken once."""
    now = timezone.now()
    claimed = _claim(message_id, now)
    if not claimed:
        return {}
    message = OutboundMessage.objects.select_related("domain").get(pk=message_id)
    content, selector = _signed(message)
    batch = [(recipient, content) for recipient in claimed]
    outcomes: dict[UUID, Outcome] = {}
    if settings.OUTBOUND_URL:
        outcomes = _via_smarthost(smarthost_parse(settings.OUTBOUND_URL), batch)
    else:
        by_domain: dict[str, list[tuple[Recipient, bytes]]] = defaultdict(list)
        for recipient, data in batch:
            by_domain[recipient.address.rpartition("@")[2].lower()].append((recipient, data))
        for domain, group in by_domain.items():
            outcomes.update(_via_mx(domain, group))
    counts: dict[str, int] = defaultdict(int)
    finished = timezone.now()
    with transaction.atomic():
        for recipient in claimed:
            outcome = outcomes.get(recipient.pk) or Outcome("deferred", "no attempt was made")
            _record(recipient, outcome, selector, finished)
            counts[str(recipient.state)] += 1
    logger.info("outbound %s: %s", message_id, dict(counts))
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
