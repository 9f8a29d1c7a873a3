"""One connector's life in the runner: connect, log in, catch up each folder, IDLE or poll.

Per folder the cursor is (UIDVALIDITY, last UID). A first connect (no cursor) starts from
the newest IMAP_INITIAL_WINDOW messages; a changed UIDVALIDITY (RFC 3501 section 2.3.1.1:
the old UIDs mean nothing any more) resets the cursor the same way and relies on the
dedupe rows, so the old mail is not taken twice. New mail is ``UID FETCH last+1:* (UID
RFC822.SIZE)`` then ``UID FETCH ... BODY.PEEK[]`` on a folder opened with EXAMINE: the source mailbox is
never changed (no ``\\Seen``, no move, no delete). Each message is taken in through
``accept`` before the cursor moves past it (:func:`ingest.imap.leases.messages_take`), and
handed to the runner's drainer.

An IDLE wake costs two IMAP round trips and one transaction: the session keeps each
folder's cursor once read, the folder stays open, and ``UID FETCH last+1:* (UID
RFC822.SIZE)`` lists the new UIDs with their sizes (see :meth:`Session._folder_sync`).

Failures back off exponentially with full jitter (sleep a random time between 0 and
min(cap, base * 2^n)); refused credentials stop the session (``auth_failed``) instead of
retrying, so a server that answers ``[AUTHENTICATIONFAILED]`` is not hammered.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from uuid import UUID

from django.conf import settings

from ingest.imap import leases, metrics, oauth, target
from ingest.imap.client import (
    ImapAuthFailed,
    ImapClient,
    ImapError,
    ImapTlsError,
    connect,
    tls_context,
)
from ingest.models import Connector
from mailplatform.transport import UrlRefused
from tenants import crypto

logger = logging.getLogger(__name__)

T = TypeVar("T")
BACKOFF_BASE = 1.0
FETCH_BATCH = 20

DbCall = Callable[..., Awaitable[Any]]


async def open_connection(connector: Connector) -> ImapClient:
    """Resolve and check the host once, connect to that address, TLS as configured."""
    if connector.tls_mode == Connector.TlsMode.NONE and not settings.CONNECTOR_ALLOW_INSECURE:
        raise ImapTlsError("plaintext IMAP is not allowed (CONNECTOR_ALLOW_INSECURE is off)")
    address = await target.host_resolve_async(connector.host, connector.port)
    return await connect(
        host=connector.host,
        address=address,
        port=connector.port,
        tls_mode=connector.tls_mode,
        timeout=float(settings.CONNECTOR_TIMEOUT),
        context=tls_context(ca_file=settings.OUTBOUND_CA_FILE),
    )


async def credentials_login(client: ImapClient, connector: Connector, access_token: str | None = None) -> None:
    """LOGIN with the password, or AUTHENTICATE with an OAuth2 access token."""
    if connector.auth_type == Connector.AuthType.PASSWORD:
        await client.login(connector.username, crypto.decrypt(connector.password_encrypted))
        return
    if access_token is None:
        fresh = oauth.access_token_fresh(connector)
        if fresh is None:
            raise ImapAuthFailed("no valid access token")
        access_token = fresh[0]
    mechanism = "XOAUTH2" if connector.auth_type == Connector.AuthType.XOAUTH2 else "OAUTHBEARER"
    await client.authenticate_oauth(mechanism, connector.username, access_token)


def backoff_delay(attempt: int, cap: float) -> float:
    """Full jitter (AWS architecture blog, "Exponential Backoff And Jitter")."""
    return random.uniform(0, min(cap, BACKOFF_BASE * (2 ** min(attempt, 20))))


class Session:
    """The task of one claimed connector; ends on cancel (lease lost, stop) or auth_failed."""

    def __init__(
        self,
        *,
        connector_id: UUID,
        token: int,
        db: DbCall,
        stagger: float,
        drain: Callable[[list[str]], None],
        connect_slots: asyncio.Semaphore | None = None,
    ) -> None:
        self.connector_id = connector_id
        self.token = token
        self.db = db
        self.stagger = stagger
        self.drain = drain
        # Connect, log in and catch up a few accounts at a time: a thousand sessions starting
        # together would otherwise all hold their first fetches and queries at once.
        self.connect_slots = connect_slots or asyncio.Semaphore(1_000_000)
        self.client: ImapClient | None = None
        self.connected = False
        self.stopped = False
        self.cursors: dict[str, tuple[int, int]] = {}  # folder -> (UIDVALIDITY, last UID)

    def stop(self) -> None:
        """Stop for good (lease lost, runner shutting down): the socket closes at once, so a
        pending read ends even if a cancellation were swallowed on the way."""
        self.stopped = True
        self._disconnect()

    async def run(self) -> None:
        if self.stagger > 0:  # spread a thousand first connects over the stagger window
            await asyncio.sleep(random.uniform(0, self.stagger))
        attempt = 0
        try:
            while not self.stopped:
                try:
                    await self._connected_loop()
                except leases.LeaseLost:
                    logger.info("connector %s: lease lost", self.connector_id)
                    return
                except (ImapAuthFailed, oauth.OAuthRevoked) as exc:
                    if self.stopped:
                        return
                    metrics.ERRORS.labels("auth_failed").inc()
                    logger.warning("connector %s: authentication failed: %s", self.connector_id, exc)
                    await self._state(Connector.State.AUTH_FAILED, error=str(exc), kind="auth_failed")
                    return
                except (ImapError, UrlRefused, oauth.OAuthError, OSError) as exc:
                    if self.stopped:
                        return
                    kind = getattr(exc, "kind", "host_refused" if isinstance(exc, UrlRefused) else "network")
                    metrics.ERRORS.labels(kind).inc()
                    logger.info("connector %s: %s: %s", self.connector_id, kind, exc)
                    await self._state(Connector.State.BACKOFF, error=str(exc), kind=kind)
                    # A session that ran a while (kick, server restart) starts counting again.
                    attempt = 0 if self.connected else attempt + 1
                    self._disconnect()
                    await asyncio.sleep(backoff_delay(attempt, float(settings.CONNECTOR_BACKOFF_MAX)))
                finally:
                    self._disconnect()
        except leases.LeaseLost:
            return

    def _disconnect(self) -> None:
        if self.connected:
            metrics.CONNECTED.dec()
            self.connected = False
        if self.client is not None:
            self.client.close()
            self.client = None

    async def _state(self, state: str, *, error: str = "", kind: str = "") -> None:
        await self.db(leases.state_set, connector_id=self.connector_id, token=self.token, state=state, error=error,
                      error_kind=kind)  # fmt: skip

    async def _access_token(self, connector: Connector) -> str | None:
        if connector.auth_type == Connector.AuthType.PASSWORD:
            return None
        fresh = oauth.access_token_fresh(connector)
        if fresh is not None:
            return fresh[0]
        access, expires, rotated = await self.db(oauth.access_token_refresh, connector)
        await self.db(
            leases.oauth_tokens_store, connector_id=self.connector_id, token=self.token, access_token=access,
            expires_at=expires, refresh_token=rotated,
        )  # fmt: skip
        return str(access)

    async def _connected_loop(self) -> None:
        self.cursors = {}  # read again after a reconnect: a resync may have forgotten them
        async with self.connect_slots:
            connector: Connector = await self.db(leases.connector_load, self.connector_id)
            access_token = await self._access_token(connector)
            self.client = client = await open_connection(connector)
            await credentials_login(client, connector, access_token)
            folders = list(connector.folders) or ["INBOX"]
            idle = "IDLE" in client.capabilities
            # Catch up before saying "connected": an error here is a connect error.
            await self._sync(client, folders)
            await self._state(Connector.State.IDLE if idle else Connector.State.POLLING)
        self.connected = True
        metrics.CONNECTED.inc()
        idle_seconds = float(settings.CONNECTOR_IDLE_SECONDS)
        if len(folders) > 1:  # the other folders are looked at every poll interval
            idle_seconds = min(idle_seconds, float(settings.CONNECTOR_POLL_INTERVAL))
        while not self.stopped:
            if connector.auth_type != Connector.AuthType.PASSWORD:
                expires = connector.oauth_access_token_expires_at
                if expires is not None and expires - oauth.REFRESH_MARGIN < _now():
                    return  # reconnect with a fresh token (the old session stays valid meanwhile)
            if idle:
                # Jitter so a thousand sessions do not re-issue IDLE in the same second.
                await client.idle(timeout=idle_seconds * random.uniform(0.9, 1.0))
            else:
                await asyncio.sleep(float(settings.CONNECTOR_POLL_INTERVAL) * random.uniform(0.9, 1.1))
            await self._sync(client, folders, woken=idle)

    async def _sync(self, client: ImapClient, folders: list[str], *, woken: bool = False) -> None:
        # The first folder last: it stays selected for IDLE. Mail that arrived during its
        # fetch was announced then (not again in IDLE): look again until nothing came.
        for folder in folders[1:]:
            await self._folder_sync(client, folder)
        for _ in range(100):
            await self._folder_sync(client, folders[0], woken=woken)
            if not client.new_mail_seen:
                break

    async def _folder_sync(self, client: ImapClient, folder: str, *, woken: bool = False) -> None:
        """Take the folder's new mail in.

        The cursor lives in the session once read or written (a write that finds it gone, a
        resync, raises CursorGone and the session reads it again). A folder still open since
        IDLE answered (``woken``: IDLE is a sync point, its EXISTS already in the server's
        view) is not opened again: one ``UID FETCH last+1:* (UID RFC822.SIZE)`` then finds
        the new UIDs. EXAMINE otherwise (first look, another folder was opened, polling, or
        the server announced another UIDVALIDITY), which also checks UIDVALIDITY.
        """
        cursor = self.cursors.get(folder)
        if woken and cursor is not None and client.selected == folder:
            client.new_mail_seen = False
            if client.exists == 0:
                return
            try:
                await self._new_mail_take(client, folder, *cursor)
                if client.selected == folder:  # no UIDVALIDITY announced meanwhile
                    return
            except leases.CursorGone:
                self.cursors.pop(folder, None)
            cursor = None
        status = await client.examine(folder)
        if cursor is None or cursor[0] != status.uid_validity:
            stored = await self.db(leases.cursor_get, self.connector_id, folder)
            cursor = (stored.uid_validity, stored.last_uid) if stored is not None else None
        if cursor is None or cursor[0] != status.uid_validity:
            if cursor is not None:
                logger.info(
                    "connector %s: %s UIDVALIDITY %s -> %s, cursor reset",
                    self.connector_id, folder, cursor[0], status.uid_validity,
                )  # fmt: skip
                metrics.UIDVALIDITY_RESETS.inc()
            window = int(settings.IMAP_INITIAL_WINDOW)
            if status.exists <= window:
                last = 0
            elif window == 0:
                last = (status.uid_next - 1) if status.uid_next else await client.uid_of_sequence(status.exists)
            else:
                last = await client.uid_of_sequence(status.exists - window + 1) - 1
            await self.db(
                leases.cursor_set, connector_id=self.connector_id, token=self.token, folder=folder,
                uid_validity=status.uid_validity, last_uid=last,
            )  # fmt: skip
            cursor = (status.uid_validity, last)
        self.cursors[folder] = cursor
        uid_validity, last = cursor
        if status.exists == 0 or (status.uid_next and status.uid_next <= last + 1):
            return
        try:
            await self._new_mail_take(client, folder, uid_validity, last)
        except leases.CursorGone:  # forgotten (resync) since it was read: next pass starts over
            self.cursors.pop(folder, None)
            client.new_mail_seen = True

    async def _new_mail_take(self, client: ImapClient, folder: str, uid_validity: int, last: int) -> None:
        """Fetch the UIDs above ``last`` and take them in, FETCH_BATCH at a time: one
        transaction a batch (fenced; the cursor moves with the durable spool writes)."""
        sizes = await client.uid_sizes_from(last + 1)
        limit = int(settings.INGEST_MAX_MESSAGE_SIZE)
        uids = sorted(sizes)
        for start in range(0, len(uids), FETCH_BATCH):
            batch = uids[start : start + FETCH_BATCH]
            wanted = [uid for uid in batch if sizes[uid] <= limit]
            for uid in batch:
                if uid not in wanted:
                    logger.warning("connector %s: %s UID %s too large (%s bytes), skipped", self.connector_id,
                                   folder, uid, sizes[uid])  # fmt: skip
            bodies = dict(await client.uid_fetch_bodies(wanted)) if wanted else {}
            if client.selected != folder:  # another UIDVALIDITY was announced: these UIDs are
                client.new_mail_seen = True  # not the cursor's; look again after an EXAMINE
                return
            # Too large, or expunged meanwhile (no body): the cursor moves past it.
            started = time.monotonic()
            queue_ids = await self.db(
                leases.messages_take, connector_id=self.connector_id, token=self.token, folder=folder,
                uid_validity=uid_validity, messages=[(uid, bodies.get(uid)) for uid in batch],
            )  # fmt: skip
            self.cursors[folder] = (uid_validity, batch[-1])
            taken = [queue_id for queue_id in queue_ids if queue_id is not None]
            fetched = sum(1 for uid in batch if uid in bodies)
            if fetched > len(taken):
                metrics.FETCHED.labels("duplicate").inc(fetched - len(taken))
            if taken:
                metrics.FETCHED.labels("accepted").inc(len(taken))
                metrics.TAKE_SECONDS.observe(time.monotonic() - started)
                self.drain(taken)


def _now() -> Any:
    from django.utils import timezone

    return timezone.now()
