"""The recipient directory: RCPT decisions from memory, refreshed from the database.

A background thread reloads a snapshot of every domain and live mailbox whenever the
database says something changed (a cheap fingerprint query every INGEST_DIRECTORY_REFRESH
seconds), so an RCPT costs a dict lookup, never a database round trip. If the snapshot is
missing (the database was never reachable) or too old (the database is down), answers that
would reject become ``451 4.3.0``: a stale directory may delay mail, never bounce it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models import Count, Max
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
    mailboxes: dict[str, MailboxEntry] = field(default_factory=dict)
    catch_all: MailboxEntry | None = None


@dataclass(frozen=True)
class Decision:
    """The RCPT answer and, when accepted, where the message goes."""

    reply: Reply
    mailbox_id: str | None = None
    tenant_id: str | None = None
    tags: tuple[str, ...] = ()
    drop: bool = False  # accepted but discarded (the domain hides which users exist)
    max_message_size: int | None = None

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
    domains: dict[str, DomainEntry] = {}
    by_id: dict[str, DomainEntry] = {}
    largest: int | None = None
    rows = Domain.objects.values_list(
        "pk",
        "name",
        "tenant_id",
        "state",
        "recipient_policy",
        "tenant__status",
        "tenant__max_message_size",
        "tenant__plan",
    )
    unverified_plans = settings.UNVERIFIED_DOMAIN_PLANS
    for pk, name, tenant_id, state, policy, tenant_status, max_size, plan in rows.iterator(chunk_size=2000):
        entry = DomainEntry(
            domain_id=str(pk),
            tenant_id=str(tenant_id),
            state=state,
            tenant_active=tenant_status == Tenant.Status.ACTIVE,
            policy=policy,
            max_message_size=max_size,
            unverified_allowed=plan in unverified_plans,
        )
        domains[name] = entry
        by_id[str(pk)] = entry
        if max_size is not None:
            largest = max(largest or 0, max_size)
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


class RecipientDirectory:
    """In-process directory; :meth:`decide` never touches the database."""

    def __init__(self, *, refresh: float = 2.0, max_staleness: float | None = None) -> None:
        self.refresh = refresh
        # Positive answers from an old snapshot are still right for accepting (the spool
        # absorbs it); negative ones are not trusted past this age.
        self.max_staleness = max_staleness if max_staleness is not None else max(15.0, refresh * 5)
        self._snapshot: Snapshot | None = None
        self._checked_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
        self._checked_at = time.monotonic()
        return True

    def start(self) -> None:
        self.reload()
        self._thread = threading.Thread(target=self._run, name="recipient-directory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

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
    def decide(self, address: str) -> Decision:
        """The RCPT decision for ``address`` (DESIGN section 3 step 1)."""
        snapshot = self._snapshot
        if snapshot is None:
            return Decision(DIRECTORY_DOWN)
        trusted = self.fresh
        parts = address_split(address)
        if parts is None:
            return Decision(Reply(501, "5.1.3 Bad recipient address syntax"))
        local, domain_name, tags = parts
        domain = snapshot.domains.get(domain_name)
        if domain is None:
            return Decision(RELAY_DENIED if trusted else DIRECTORY_DOWN)
        common = {"tenant_id": domain.tenant_id, "tags": tags, "max_message_size": domain.max_message_size}
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
