"""The recipient directory: RCPT decisions from memory, refreshed from the database.

A background thread reloads a snapshot of every domain and live mailbox whenever the
database says something changed (a cheap fingerprint query every INGEST_DIRECTORY_REFRESH
seconds), so accepting an RCPT costs a dict lookup, never a database round trip.

A snapshot is never trusted to *refuse*: a mailbox created a second ago is not in it yet, and
a ``550`` is permanent (RFC 5321 section 4.2.1), so the sender would drop the mail. A miss is
asked of the database (:meth:`RecipientDirectory.decide_checked`, off the event loop in a
bounded thread pool), and only the database's answer, just given, refuses. A refused address
is remembered for INGEST_DIRECTORY_NEGATIVE_TTL seconds (forgotten as soon as a new snapshot
shows a change), and asked again within that time it is deferred with ``450 4.1.1``, not
refused: a flood of unknown recipients costs one query per address per second, not one per
RCPT, and a mailbox created within that second is merely retried. With the database
unreachable (or slow, or every look-up slot busy), or a snapshot missing or too old, what
would be refused becomes ``451 4.3.0``: mail may be delayed, never bounced.

Domain names: several tenants may hold the same name pending (tenants.services.domain_create).
The verified (or mx_lost, suspended) row is the only one that routes; without one, a pending
name routes only for a tenant whose plan receives on unverified domains
(UNVERIFIED_DOMAIN_PLANS) and only when exactly one such tenant holds it. Two of them is a
conflict nobody has proved: the name is not ours until one verifies, so neither can read mail
meant for the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models import Count, Max, Q
from django.utils import timezone

logger = logging.getLogger(__name__)

POSTMASTER = "postmaster"  # RFC 5321 section 4.5.1: every domain accepts it


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


OK = Reply(250, "2.1.5 Ok")
UNKNOWN_USER = Reply(550, "5.1.1 No such user here")
RELAY_DENIED = Reply(550, "5.7.1 Relaying denied: not a domain this server receives mail for")
SUSPENDED = Reply(550, "5.7.1 Mail for this domain is not accepted")
MX_LOST = Reply(451, "4.7.1 Mail for this domain is temporarily not accepted, try again later")
DIRECTORY_DOWN = Reply(451, "4.3.0 Recipient directory unavailable, try again later")
# A recipient the database refused a moment ago: remembered, but memory never bounces mail.
REFUSED_RECENTLY = Reply(450, "4.1.1 Recipient not accepted right now, try again later")


@dataclass(frozen=True)
class MailboxEntry:
    mailbox_id: str
    expires_at: datetime | None

    def is_live(self, now: datetime) -> bool:
        return self.expires_at is None or self.expires_at > now


@dataclass
class DomainEntry:
    domain_id: str
    tenant_id: str
    state: str
    tenant_active: bool
    policy: str
    max_message_size: int | None
    # The tenant's plan lets it receive for domains not verified yet (UNVERIFIED_DOMAIN_PLANS).
    unverified_allowed: bool = False
    antivirus_mode: str = ""  # resolved: the domain's, else the tenant's, else ANTIVIRUS_MODE
    dmarc_reject: bool = False  # refuse SMTP mail failing DMARC under p=reject (ingest/smtp.py)
    mailboxes: dict[str, MailboxEntry] = field(default_factory=dict)
    catch_all: MailboxEntry | None = None


_CLAIMED = frozenset({"verified", "mx_lost", "suspended"})
_DOMAIN_COLUMNS = (
    "pk",
    "name",
    "tenant_id",
    "state",
    "recipient_policy",
    "tenant__status",
    "tenant__max_message_size",
    "tenant__plan",
    "antivirus_mode",
    "tenant__antivirus_mode",
    "dmarc_reject",
)


def _domain_entry(row: tuple[object, ...]) -> DomainEntry:
    from tenants.models import Tenant

    pk, _name, tenant_id, state, policy, tenant_status, max_size, plan = row[:8]
    domain_antivirus, tenant_antivirus = row[8:10]
    return DomainEntry(
        domain_id=str(pk),
        tenant_id=str(tenant_id),
        state=str(state),
        tenant_active=tenant_status == Tenant.Status.ACTIVE,
        policy=str(policy),
        max_message_size=max_size,  # type: ignore[arg-type]
        unverified_allowed=plan in settings.UNVERIFIED_DOMAIN_PLANS,
        antivirus_mode=str(domain_antivirus or tenant_antivirus or settings.ANTIVIRUS_MODE),
        dmarc_reject=bool(row[10]),
    )


def domain_entry_pick(entries: Iterable[DomainEntry]) -> DomainEntry | None:
    """The row that routes a name shared by several tenants (see the module docstring)."""
    candidates = list(entries)
    claimed = [entry for entry in candidates if entry.state in _CLAIMED]
    if claimed:
        return claimed[0]  # at most one: the partial unique constraint on Domain.name
    if not candidates:
        return None
    receiving = [entry for entry in candidates if entry.unverified_allowed]
    if len(receiving) == 1:
        return receiving[0]
    # Nobody may receive (or two could): answered as a pending name nobody can use.
    return DomainEntry(
        domain_id=candidates[0].domain_id,
        tenant_id=candidates[0].tenant_id,
        state="pending",
        tenant_active=candidates[0].tenant_active,
        policy=candidates[0].policy,
        max_message_size=None,
        unverified_allowed=False,
    )


@dataclass(frozen=True)
class Decision:
    """The RCPT answer and, when accepted, where the message goes."""

    reply: Reply
    mailbox_id: str | None = None
    tenant_id: str | None = None
    tags: tuple[str, ...] = ()
    drop: bool = False  # accepted but discarded (the domain hides which users exist)
    max_message_size: int | None = None
    antivirus_mode: str = ""  # "reject": scanned before the 250 (ingest/smtp.py)
    dmarc_reject: bool = False  # DMARC checked before the 250 (ingest/smtp.py)

    @property
    def accepted(self) -> bool:
        return self.reply.code == 250


@dataclass
class Snapshot:
    domains: dict[str, DomainEntry]
    loaded_at: float
    fingerprint: tuple[object, ...]
    max_message_size: int | None  # the largest per-tenant override


def address_split(address: str) -> tuple[str, str, tuple[str, ...]] | None:
    """``Box+tag@Example.COM`` -> ("box", "example.com", ("tag",)); None if malformed."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    domain = domain.strip().rstrip(".").lower()
    try:
        domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return None
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        local = local[1:-1]
    base, _, tag_part = local.lower().partition("+")
    tags = tuple(tag for tag in tag_part.split("+") if tag) if tag_part else ()
    return base, domain, tags


def snapshot_load(previous_fingerprint: tuple[object, ...] | None = None) -> Snapshot | None:
    """Read the directory from the database; None when nothing changed since the fingerprint."""
    from mailboxes.models import Mailbox
    from tenants.models import Domain, Tenant

    fingerprint = (
        tuple(Domain.objects.aggregate(n=Count("pk"), t=Max("updated_at")).values()),
        tuple(Mailbox.objects.aggregate(n=Count("pk"), t=Max("updated_at")).values()),
        tuple(Tenant.objects.aggregate(n=Count("pk"), t=Max("updated_at")).values()),
    )
    if previous_fingerprint is not None and fingerprint == previous_fingerprint:
        return None
    by_name: dict[str, list[DomainEntry]] = {}
    largest: int | None = None
    for row in Domain.objects.values_list(*_DOMAIN_COLUMNS).iterator(chunk_size=2000):
        by_name.setdefault(str(row[1]), []).append(_domain_entry(row))
        if row[6] is not None:
            largest = max(largest or 0, int(row[6]))  # type: ignore[call-overload]
    domains: dict[str, DomainEntry] = {}
    by_id: dict[str, DomainEntry] = {}
    for name, entries in by_name.items():
        entry = domain_entry_pick(entries)
        if entry is not None:
            domains[name] = entry
            by_id[entry.domain_id] = entry
    now = timezone.now()
    mailboxes = Mailbox.objects.live().values_list("pk", "domain_id", "local_part", "is_catch_all", "expires_at")
    for pk, domain_id, local_part, is_catch_all, expires_at in mailboxes.iterator(chunk_size=5000):
        domain_entry = by_id.get(str(domain_id))
        if domain_entry is None:
            continue
        mailbox = MailboxEntry(mailbox_id=str(pk), expires_at=expires_at)
        if mailbox.is_live(now):
            domain_entry.mailboxes[local_part] = mailbox
            if is_catch_all:
                domain_entry.catch_all = mailbox
    return Snapshot(domains=domains, loaded_at=time.monotonic(), fingerprint=fingerprint, max_message_size=largest)


def domain_entry_load(domain_name: str, local: str) -> DomainEntry | None:
    """One domain from the database, with only the mailboxes that could take ``local``."""
    from mailboxes.models import Mailbox
    from tenants.models import Domain

    entry = domain_entry_pick(
        _domain_entry(row) for row in Domain.objects.filter(name=domain_name).values_list(*_DOMAIN_COLUMNS)
    )
    if entry is None:
        return None
    now = timezone.now()
    rows = (
        Mailbox.objects.live()
        .filter(Q(local_part=local) | Q(is_catch_all=True), domain_id=entry.domain_id)
        .values_list("pk", "local_part", "is_catch_all", "expires_at")
    )
    for pk, local_part, is_catch_all, expires_at in rows:
        mailbox = MailboxEntry(mailbox_id=str(pk), expires_at=expires_at)
        if mailbox.is_live(now):
            entry.mailboxes[local_part] = mailbox
            if is_catch_all:
                entry.catch_all = mailbox
    return entry


# Refusals a snapshot may be wrong about; each is asked of the database before it is given.
_CHECKED_REFUSALS = frozenset({550})
_NEGATIVE_CACHE_SIZE = 10_000


class RecipientDirectory:
    """In-process directory: :meth:`decide` answers from memory; :meth:`decide_checked`
    (what RCPT uses) confirms any refusal with the database first."""

    def __init__(
        self,
        *,
        refresh: float = 2.0,
        max_staleness: float | None = None,
        check_misses: bool = True,
        lookups: int | None = None,
        lookup_timeout: float | None = None,
        negative_ttl: float | None = None,
    ) -> None:
        self.refresh = refresh
        # Positive answers from an old snapshot are still right for accepting (the spool
        # absorbs it); negative ones are not trusted past this age.
        self.max_staleness = max_staleness if max_staleness is not None else max(15.0, refresh * 5)
        self.check_misses = check_misses
        self.lookups = lookups if lookups is not None else settings.INGEST_DIRECTORY_LOOKUPS
        self.lookup_timeout = (
            lookup_timeout if lookup_timeout is not None else float(settings.INGEST_DIRECTORY_LOOKUP_TIMEOUT)
        )
        self.negative_ttl = negative_ttl if negative_ttl is not None else float(settings.INGEST_DIRECTORY_NEGATIVE_TTL)
        self._snapshot: Snapshot | None = None
        self._checked_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight = 0
        # address -> (refusal, monotonic expiry, the snapshot fingerprint it was made under)
        self._refused: dict[str, tuple[Decision, float, tuple[object, ...]]] = {}

    # --- loading --------------------------------------------------------------------
    def reload(self) -> bool:
        """One refresh from the database; False (and the old snapshot kept) if it is down."""
        try:
            previous = self._snapshot.fingerprint if self._snapshot else None
            snapshot = snapshot_load(previous)
        except Exception as exc:  # the database being down is expected here; keep serving
            logger.warning("recipient directory refresh failed: %s: %s", type(exc).__name__, exc)
            with contextlib.suppress(Exception):  # a broken connection may refuse to close
                connection.close()
            return False
        if snapshot is not None:
            self._snapshot = snapshot
            self._refused = {}  # something changed: no refusal made before it stands
        self._checked_at = time.monotonic()
        return True

    def start(self) -> None:
        self.reload()
        self._thread = threading.Thread(target=self._run, name="recipient-directory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.wait(self.refresh):
            close_old_connections()  # this thread's own connection; drop it if it broke
            self.reload()

    @property
    def fresh(self) -> bool:
        return self._snapshot is not None and time.monotonic() - self._checked_at <= self.max_staleness

    def max_message_size(self, default: int) -> int:
        """The SIZE to advertise (RFC 1870): the largest any tenant accepts."""
        snapshot = self._snapshot
        if snapshot is None or snapshot.max_message_size is None:
            return default
        return max(default, snapshot.max_message_size)

    # --- deciding -------------------------------------------------------------------
    async def decide_checked(self, address: str) -> Decision:
        """The RCPT decision: from memory when it accepts, from the database when the
        snapshot would refuse (a snapshot is never fresh enough to bounce mail)."""
        decision = self.decide(address)
        if decision.accepted or decision.reply.code not in _CHECKED_REFUSALS or not self.check_misses:
            return decision
        snapshot = self._snapshot
        if snapshot is None:
            return Decision(DIRECTORY_DOWN)
        key = address.lower()
        remembered = self._refused.get(key)
        if remembered is not None and remembered[1] > time.monotonic() and remembered[2] == snapshot.fingerprint:
            return Decision(REFUSED_RECENTLY)
        if self._in_flight >= self.lookups:
            logger.warning("recipient directory: every database look-up slot is busy; answering 451")
            return Decision(DIRECTORY_DOWN)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.lookups, thread_name_prefix="directory-lookup")
        self._in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            decision = await asyncio.wait_for(
                loop.run_in_executor(self._executor, self._lookup, address), timeout=self.lookup_timeout
            )
        except Exception as exc:  # down, slow or broken: delay the mail, never bounce it
            logger.warning("recipient directory look-up failed: %s: %s", type(exc).__name__, exc)
            return Decision(DIRECTORY_DOWN)
        finally:
            self._in_flight -= 1
        if not decision.accepted and self.negative_ttl > 0:
            if len(self._refused) >= _NEGATIVE_CACHE_SIZE:
                self._refused = {}
            self._refused[key] = (decision, time.monotonic() + self.negative_ttl, snapshot.fingerprint)
        return decision

    def _lookup(self, address: str) -> Decision:
        """The authoritative decision for one address (runs in a look-up thread)."""
        close_old_connections()  # this thread's own connection: drop it if it broke or aged
        try:
            parts = address_split(address)
            if parts is None:
                return Decision(Reply(501, "5.1.3 Bad recipient address syntax"))
            local, domain_name, tags = parts
            return self._decide_for(domain_entry_load(domain_name, local), local, tags, trusted=True)
        except Exception:
            with contextlib.suppress(Exception):  # a broken connection may refuse to close
                connection.close()
            raise

    def decide(self, address: str) -> Decision:
        """The RCPT decision for ``address`` from the snapshot alone (DESIGN section 3 step 1)."""
        snapshot = self._snapshot
        if snapshot is None:
            return Decision(DIRECTORY_DOWN)
        parts = address_split(address)
        if parts is None:
            return Decision(Reply(501, "5.1.3 Bad recipient address syntax"))
        local, domain_name, tags = parts
        return self._decide_for(snapshot.domains.get(domain_name), local, tags, trusted=self.fresh)

    @staticmethod
    def _decide_for(domain: DomainEntry | None, local: str, tags: tuple[str, ...], *, trusted: bool) -> Decision:
        if domain is None:
            return Decision(RELAY_DENIED if trusted else DIRECTORY_DOWN)
        common = {
            "tenant_id": domain.tenant_id,
            "tags": tags,
            "max_message_size": domain.max_message_size,
            "antivirus_mode": domain.antivirus_mode,
            "dmarc_reject": domain.dmarc_reject,
        }
        if domain.state == "pending" and not domain.unverified_allowed:
            return Decision(RELAY_DENIED if trusted else DIRECTORY_DOWN)
        if not domain.tenant_active or domain.state == "suspended":
            return Decision(SUSPENDED if trusted else DIRECTORY_DOWN)
        if domain.state == "mx_lost":
            return Decision(MX_LOST)
        now = timezone.now()
        mailbox = domain.mailboxes.get(local)
        if mailbox is not None and mailbox.is_live(now):
            return Decision(OK, mailbox_id=mailbox.mailbox_id, **common)  # type: ignore[arg-type]
        if local == POSTMASTER:
            # Accepted for every domain (RFC 5321 section 4.5.1); delivered to the catch-all
            # mailbox when there is one, otherwise accepted and dropped.
            if domain.catch_all is not None and domain.catch_all.is_live(now):
                return Decision(OK, mailbox_id=domain.catch_all.mailbox_id, **common)  # type: ignore[arg-type]
            return Decision(OK, drop=True, **common)  # type: ignore[arg-type]
        if domain.policy == "catch_all" and domain.catch_all is not None and domain.catch_all.is_live(now):
            return Decision(OK, mailbox_id=domain.catch_all.mailbox_id, **common)  # type: ignore[arg-type]
        if domain.policy == "drop":
            return Decision(OK, drop=True, **common)  # type: ignore[arg-type]
        return Decision(UNKNOWN_USER if trusted else DIRECTORY_DOWN)
