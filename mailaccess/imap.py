"""An IMAP4rev1 server (RFC 3501) over the stored mail, on asyncio streams.

Extensions: IDLE (RFC 2177), UIDPLUS (RFC 4315), MOVE (RFC 6851), NAMESPACE (RFC 2342),
ENABLE (RFC 5161), LITERAL+ (RFC 7888), ID (RFC 2971), UNSELECT (RFC 3691), SASL-IR
(RFC 4959). One folder per mailbox the credentials see; sequence numbers and UIDs per
session (RFC 3501 section 2.3.1); database work in the waiters' bounded pool.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import ssl
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import IO, Any
from uuid import UUID

from django.conf import settings

from audit import context as audit_context
from mailaccess import metrics, store
from mailaccess.auth import Access, LoginRefused, login
from mailaccess.imapwire import (
    LITERAL_AT_END,
    Literal,
    ParseError,
    Token,
    bodystructure,
    envelope,
    in_ranges,
    internal_date,
    parse_date,
    plist,
    quoted,
    sequence_set,
    tokenize,
)
from mailaccess.limits import ConnectionLimits, client_address, is_loopback
from mailaccess.mime import Entity, SectionError, header_fields, parse, section_bounds, section_range
from mailboxes.blobs import blob_get
from mailboxes.waiting import db, hub_current

logger = logging.getLogger(__name__)

LINE_LIMIT = 64 * 1024
CHUNK = 64 * 1024
PERMANENT_FLAGS = b"(\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)"
FLAGS = b"(\\Answered \\Flagged \\Deleted \\Seen \\Draft)"
FETCH_MACROS = {
    "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
    "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
    "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
}
_BODY_ITEM = re.compile(
    r"^(BODY|BODY\.PEEK|BINARY|BINARY\.PEEK)\[(.*)\](?:<(\d+)(?:\.(\d+))?>)?$", re.IGNORECASE | re.DOTALL
)


class CommandError(Exception):
    """Ends a command with ``NO`` or ``BAD`` and this text (and an optional response code)."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


def _no(text: str) -> CommandError:
    return CommandError("NO", text)


def _bad(text: str) -> CommandError:
    return CommandError("BAD", text)


def _string(token: Token) -> str:
    if isinstance(token, Literal):
        return token.data.decode("utf-8", "replace")
    if isinstance(token, list):
        raise _bad("string expected")
    return token


@dataclass
class FetchItem:
    name: str  # as echoed in the response
    kind: str  # FLAGS, UID, ... or BODY for sections
    section: str = ""
    peek: bool = True
    origin: int | None = None
    count: int | None = None


@dataclass
class Selected:
    name: str
    mailbox_id: UUID
    readonly: bool
    uid_validity: int
    uids: array[int]  # 8 bytes a message: a session on a folder of 100,000 holds 800 KB

    def seq_of(self, uid: int) -> int:
        from bisect import bisect_left

        index = bisect_left(self.uids, uid)
        return index + 1 if index < len(self.uids) and self.uids[index] == uid else 0


@dataclass
class ImapOptions:
    tls_context: ssl.SSLContext | None
    implicit_tls: bool = False
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    idle_timeout: float = 1800.0
    hostname: str = "mailplatform"


class ImapSession:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, options: ImapOptions) -> None:
        self.reader, self.writer, self.options = reader, writer, options
        peer = writer.get_extra_info("peername") or ("", 0)
        self.ip: str | None = peer[0] if peer else None
        self.tls = options.implicit_tls
        self.access: Access | None = None
        self.selected: Selected | None = None
        self.cache: OrderedDict[str, tuple[IO[bytes], Entity]] = OrderedDict()
        self.key_slot: Any = None
        self.closing = False

    # --- I/O ------------------------------------------------------------------------------
    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        metrics.BYTES_SENT.labels("imap").inc(len(data))
        await self.writer.drain()

    async def untagged(self, text: bytes) -> None:
        await self.send(b"* " + text + b"\r\n")

    async def read_line(self, timeout: float) -> bytes:
        try:
            line = await asyncio.wait_for(self.reader.readuntil(b"\n"), timeout)
        except asyncio.LimitOverrunError:
            raise _bad("line too long") from None
        return line

    async def read_command(self) -> tuple[str, str, list[bytes | Literal]] | None:
        timeout = self.options.idle_timeout if self.access else 60.0
        try:
            line = await self.read_line(timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        segments: list[bytes | Literal] = []
        while True:
            match = LITERAL_AT_END.search(line)
            if not match:
                segments.append(line.rstrip(b"\r\n"))
                break
            size, plus = int(match.group(1)), bool(match.group(2))
            segments.append(line[: match.start()])
            if size > settings.INGEST_MAX_MESSAGE_SIZE:
                if plus:  # the client sends it anyway: nothing sane follows
                    return None
                tag = line.split(b" ", 1)[0].decode("ascii", "replace")
                await self.send(f"{tag} NO [TOOBIG] literal too large\r\n".encode())
                return ("", "", [])
            if not plus:
                await self.send(b"+ Ready for literal data\r\n")
            segments.append(Literal(await self.reader.readexactly(size)))
            line = await self.read_line(timeout)
        first = segments[0]
        assert isinstance(first, bytes)
        parts = first.split(b" ", 2)
        if len(parts) < 2 or not parts[0]:
            return (parts[0].decode("ascii", "replace") if parts and parts[0] else "*", "", [])
        segments[0] = parts[2] if len(parts) > 2 else b""
        return parts[0].decode("ascii", "replace"), parts[1].decode("ascii", "replace").upper(), segments

    # --- The loop -------------------------------------------------------------------------
    def capabilities(self) -> bytes:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "IDLE", "UIDPLUS", "MOVE", "NAMESPACE", "ENABLE", "ID"]
        caps += ["UNSELECT", "CHILDREN", "AUTH=PLAIN"]
        if self.options.tls_context is not None and not self.tls:
            caps.append("STARTTLS")
        if not self.plaintext_ok():
            caps.append("LOGINDISABLED")
        return " ".join(caps).encode()

    def plaintext_ok(self) -> bool:
        return self.tls or is_loopback(self.ip) or settings.MAILACCESS_ALLOW_PLAINTEXT

    async def run(self) -> None:
        metrics.CONNECTIONS.labels("imap").inc()
        try:
            await self.untagged(b"OK [CAPABILITY " + self.capabilities() + b"] mailplatform IMAP4rev1 ready")
            while True:
                command = await self.read_command()
                if command is None:
                    break
                tag, name, segments = command
                if not name:
                    if tag:
                        await self.send(f"{tag} BAD missing command\r\n".encode())
                    continue
                metrics.COMMANDS.labels("imap", name if name in _COMMANDS else "other").inc()
                try:
                    arguments = tokenize(segments)
                    done = await self.dispatch(tag, name, arguments)
                except ParseError as error:
                    await self.send(f"{tag} BAD {error}\r\n".encode())
                    continue
                except CommandError as error:
                    await self.send(f"{tag} {error.kind} {error}\r\n".encode())
                    continue
                except _StartTls:
                    await self.send(f"{tag} OK begin TLS negotiation now\r\n".encode())
                    assert self.options.tls_context is not None
                    await self.writer.start_tls(self.options.tls_context)
                    self.tls = True
                    continue
                if done is None:
                    break
                await self.send(f"{tag} {done}\r\n".encode())
                if self.closing:
                    break
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        except Exception:
            logger.exception("IMAP session failed")
            with contextlib.suppress(Exception):
                await self.untagged(b"BYE internal error")
        finally:
            for handle, _root in self.cache.values():
                handle.close()
            self.cache.clear()
            if self.key_slot is not None:
                self.options.limits.release_key(self.key_slot)

    async def dispatch(self, tag: str, name: str, args: list[Token]) -> str | None:
        if name == "UID":
            if not args:
                raise _bad("UID what?")
            sub = _string(args[0]).upper()
            if sub not in ("FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE"):
                raise _bad("unknown UID command")
            self.require_selected()
            return await getattr(self, f"cmd_{sub.lower()}")(args[1:], by_uid=True)
        handler = _COMMANDS.get(name)
        if handler is None:
            raise _bad("unknown command")
        state = handler[1]
        if state == "auth" and self.access is None:
            raise _bad("log in first")
        if state == "selected":
            self.require_selected()
        if state == "any-no-auth" and self.access is not None:
            raise _bad("already logged in")
        method = getattr(self, handler[0])
        if handler[0] in ("cmd_fetch", "cmd_store", "cmd_search", "cmd_copy", "cmd_move", "cmd_expunge"):
            return await method(args, by_uid=False)
        if handler[0] in ("cmd_authenticate", "cmd_idle"):
            return await method(tag, args)
        return await method(args)

    def require_selected(self) -> Selected:
        if self.access is None:
            raise _bad("log in first")
        if self.selected is None:
            raise _bad("select a mailbox first")
        return self.selected

    # --- Any state ------------------------------------------------------------------------
    async def cmd_capability(self, args: list[Token]) -> str:
        await self.untagged(b"CAPABILITY " + self.capabilities())
        return "OK CAPABILITY completed"

    async def cmd_noop(self, args: list[Token]) -> str:
        if self.selected:
            await self.refresh(expunge=True)
        return "OK NOOP completed"

    async def cmd_logout(self, args: list[Token]) -> str:
        await self.untagged(b"BYE logging out")
        self.closing = True
        return "OK LOGOUT completed"

    async def cmd_id(self, args: list[Token]) -> str:
        await self.untagged(b'ID ("name" "mailplatform" "vendor" "mailplatform")')
        return "OK ID completed"

    async def cmd_starttls(self, args: list[Token]) -> str:
        if self.options.tls_context is None or self.tls:
            raise _bad("STARTTLS not available")
        # The tagged OK goes out in plaintext, then the handshake (RFC 3501 section 6.2.1).
        raise _StartTls()

    async def cmd_login(self, args: list[Token]) -> str:
        if len(args) != 2:
            raise _bad("LOGIN user password")
        if not self.plaintext_ok():
            raise _no("[PRIVACYREQUIRED] use STARTTLS first")
        return await self.sign_in(_string(args[0]), _string(args[1]))

    async def cmd_authenticate(self, tag: str, args: list[Token]) -> str:
        if not args or _string(args[0]).upper() != "PLAIN":
            raise _no("[CANNOT] only AUTHENTICATE PLAIN")
        if not self.plaintext_ok():
            raise _no("[PRIVACYREQUIRED] use STARTTLS first")
        if len(args) > 1:
            response = _string(args[1])
        else:
            await self.send(b"+ \r\n")
            response = (await self.read_line(60.0)).strip().decode("ascii", "replace")
        if response == "*":
            raise _bad("authentication cancelled")
        try:
            decoded = base64.b64decode(response, validate=True).decode("utf-8")
            _authzid, user, password = decoded.split("\x00")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise _bad("invalid SASL PLAIN response") from None
        return await self.sign_in(user, password)

    async def sign_in(self, user: str, password: str) -> str:
        try:
            access = await db(login, username=user, password=password, ip=self.ip, protocol="imap")
        except LoginRefused as refused:
            if refused.code == "rate_limited":
                raise _no("[UNAVAILABLE] too many failed logins, try later") from None
            raise _no("[AUTHENTICATIONFAILED] invalid credentials") from None
        slot = self.options.limits.take_key(access.principal.pk)
        if slot is None:
            metrics.CONNECTIONS_REFUSED.labels("imap", "per_key").inc()
            raise _no("[LIMIT] too many connections for these credentials")
        self.key_slot = slot
        self.access = access
        return "OK [CAPABILITY " + self.capabilities().decode() + "] logged in"

    # --- Authenticated --------------------------------------------------------------------
    def folder(self, name: str) -> UUID:
        assert self.access is not None
        key = "INBOX" if name.upper() == "INBOX" else name
        mailbox_id = self.access.mailboxes.get(key)
        if mailbox_id is None:
            raise _no("[NONEXISTENT] no such mailbox")
        return mailbox_id

    async def cmd_enable(self, args: list[Token]) -> str:
        await self.untagged(b"ENABLED")
        return "OK ENABLE completed"

    async def cmd_namespace(self, args: list[Token]) -> str:
        await self.untagged(b'NAMESPACE (("" "/")) NIL NIL')
        return "OK NAMESPACE completed"

    async def cmd_list(self, args: list[Token], *, verb: str = "LIST") -> str:
        assert self.access is not None
        if len(args) < 2:
            raise _bad(f"{verb} reference pattern")
        reference, pattern = _string(args[0]), _string(args[1])
        if pattern == "":
            await self.untagged(f'{verb} (\\Noselect) "/" ""'.encode())
            return f"OK {verb} completed"
        wanted = re.compile(
            "^"
            + "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in reference + pattern)
            + "$",
            re.IGNORECASE if (reference + pattern).upper().startswith("INBOX") else 0,
        )
        for name in self.access.mailboxes:
            if wanted.match(name) or (name == "INBOX" and wanted.match("inbox")):
                await self.untagged(f'{verb} (\\HasNoChildren) "/" '.encode() + quoted(name))
        return f"OK {verb} completed"

    async def cmd_lsub(self, args: list[Token]) -> str:
        return await self.cmd_list(args, verb="LSUB")

    async def cmd_subscribe(self, args: list[Token]) -> str:
        self.folder(_string(args[0]) if args else "")
        return "OK SUBSCRIBE completed"

    async def cmd_unsubscribe(self, args: list[Token]) -> str:
        return "OK UNSUBSCRIBE completed"

    async def cmd_create(self, args: list[Token]) -> str:
        raise _no("[CANNOT] folders are mailboxes: create them in the console or the API")

    async def cmd_status(self, args: list[Token]) -> str:
        assert self.access is not None
        if len(args) != 2 or not isinstance(args[1], list):
            raise _bad("STATUS mailbox (items)")
        name = _string(args[0])
        mailbox_id = self.folder(name)
        access = self.access
        items = [_string(item).upper() for item in args[1]]
        validity, uid_next = await db(store.mailbox_uid_state, mailbox_id)
        count, _top = await db(store.folder_summary, access, mailbox_id)
        values = {"MESSAGES": count, "RECENT": 0, "UIDNEXT": uid_next, "UIDVALIDITY": validity}
        if "UNSEEN" in items:
            values["UNSEEN"] = await db(store.unseen_count, access, mailbox_id)
        out = [f"{item} {values[item]}".encode() for item in items if item in values]
        await self.untagged(b"STATUS " + quoted(name) + b" " + plist(out).replace(b"NIL", b"()"))
        return "OK STATUS completed"

    async def cmd_select(self, args: list[Token], *, readonly: bool = False) -> str:
        assert self.access is not None
        if not args:
            raise _bad("SELECT mailbox")
        self.selected = None
        name = _string(args[0])
        mailbox_id = self.folder(name)
        readonly = readonly or not self.access.can_write
        validity, uid_next = await db(store.mailbox_uid_state, mailbox_id)
        uids = await db(store.folder_uids, self.access, mailbox_id)
        self.selected = Selected(
            name="INBOX" if name.upper() == "INBOX" else name,
            mailbox_id=mailbox_id,
            readonly=readonly,
            uid_validity=validity,
            uids=array("Q", uids),
        )
        await self.untagged(b"FLAGS " + FLAGS)
        await self.untagged(b"OK [PERMANENTFLAGS " + (b"()" if readonly else PERMANENT_FLAGS) + b"] flags permitted")
        await self.untagged(b"%d EXISTS" % len(uids))
        await self.untagged(b"0 RECENT")
        await self.untagged(b"OK [UIDVALIDITY %d] UIDs valid" % validity)
        await self.untagged(b"OK [UIDNEXT %d] predicted next UID" % max(uid_next, (uids[-1] + 1) if uids else 1))
        return f"OK [{'READ-ONLY' if readonly else 'READ-WRITE'}] {'EXAMINE' if readonly else 'SELECT'} completed"

    async def cmd_examine(self, args: list[Token]) -> str:
        return await self.cmd_select(args, readonly=True)

    async def cmd_append(self, args: list[Token]) -> str:
        assert self.access is not None
        if len(args) < 2 or not isinstance(args[-1], Literal):
            raise _bad("APPEND mailbox [flags] [date] literal")
        if not self.access.can_write:
            raise _no("[NOPERM] these credentials may not add messages")
        mailbox_id = self.folder(_string(args[0]))
        content = args[-1].data
        flags = next((item for item in args[1:-1] if isinstance(item, list)), [])
        validity, uid = await db(store.message_append, self.access, mailbox_id, content, ip=self.ip, tls=self.tls)
        wanted = [_string(flag) for flag in flags]
        if wanted:
            await db(store.flags_store, self.access, mailbox_id, [uid], "+", wanted)
        if self.selected and self.selected.mailbox_id == mailbox_id:
            await self.refresh(expunge=False)
        return f"OK [APPENDUID {validity} {uid}] APPEND completed"

    async def cmd_idle(self, tag: str, args: list[Token]) -> str:
        await self.send(b"+ idling\r\n")
        selected = self.selected
        hub = hub_current() if selected is not None else None
        poll = 30.0 if hub is not None else 1.0
        reader_task = asyncio.ensure_future(self.read_line(self.options.idle_timeout))
        try:
            if hub is not None and selected is not None:
                with hub.subscribe([f"m:{selected.mailbox_id}"]) as waiter:
                    await self._idle_loop(reader_task, waiter.event, poll, waiter.take)
            else:
                await self._idle_loop(reader_task, None, poll, None)
            line = reader_task.result()
        finally:
            if not reader_task.done():
                reader_task.cancel()
            elif not reader_task.cancelled():
                # Retrieved even when IDLE ends otherwise (the server stopping): a client gone
                # meanwhile left IncompleteReadError there, "never retrieved" in the log.
                reader_task.exception()
        if line.strip().upper() != b"DONE":
            raise _bad("expected DONE")
        return "OK IDLE terminated"

    async def _idle_loop(
        self, reader_task: asyncio.Future[bytes], event: asyncio.Event | None, poll: float, take: Any
    ) -> None:
        while not reader_task.done():
            waits: set[asyncio.Future[Any]] = {reader_task}
            event_task = asyncio.ensure_future(event.wait()) if event is not None else None
            if event_task is not None:
                waits.add(event_task)
            done, _pending = await asyncio.wait(waits, timeout=poll, return_when=asyncio.FIRST_COMPLETED)
            if event_task is not None and not event_task.done():
                event_task.cancel()
            if reader_task in done:
                return
            announced: list[UUID] = take()[0] if take is not None else []
            if self.selected is not None:
                known = self.selected.uids[-1] if self.selected.uids else 0
                await self.refresh(expunge=True)
                if announced:
                    await self.flags_announce(announced, known)

    async def flags_announce(self, message_ids: list[UUID], known: int) -> None:
        """Unsolicited ``FETCH (FLAGS ...)`` for announced messages the client already knew
        (another session changed their flags); new ones were just told as EXISTS."""
        selected = self.selected
        assert selected is not None and self.access is not None
        found = await db(store.flags_by_id, self.access, selected.mailbox_id, list(dict.fromkeys(message_ids)))
        for uid in sorted(found):
            seq = selected.seq_of(uid) if uid <= known else 0
            if seq:
                await self.untagged(b"%d FETCH (FLAGS (" % seq + " ".join(found[uid]).encode() + b"))")

    # --- Selected -------------------------------------------------------------------------
    async def refresh(self, *, expunge: bool) -> None:
        """Tell the client about messages that arrived (EXISTS) and, where allowed, left (EXPUNGE)."""
        selected = self.selected
        assert selected is not None and self.access is not None
        count, top = await db(store.folder_summary, self.access, selected.mailbox_id)
        if count == len(selected.uids) and top == (selected.uids[-1] if selected.uids else 0):
            return
        current = await db(store.folder_uids, self.access, selected.mailbox_id)
        changed = False
        if expunge:
            present = set(current)
            for index in range(len(selected.uids) - 1, -1, -1):
                if selected.uids[index] not in present:
                    del selected.uids[index]
                    await self.untagged(b"%d EXPUNGE" % (index + 1))
                    changed = True
        last = selected.uids[-1] if selected.uids else 0
        arrived = [uid for uid in current if uid > last]
        if arrived:
            selected.uids.extend(arrived)
        if arrived or changed:
            await self.untagged(b"%d EXISTS" % len(selected.uids))

    def targets(self, text: str, by_uid: bool) -> list[tuple[int, int]]:
        """(sequence number, UID) pairs a set names, in order."""
        selected = self.require_selected()
        uids = selected.uids
        if by_uid:
            ranges = sequence_set(text, uids[-1] if uids else 0)
            if text.endswith("*") and uids:  # "n:*" always includes the highest UID
                ranges = [(min(a, uids[-1]), max(b, uids[-1])) for a, b in ranges]
            from bisect import bisect_left, bisect_right

            chosen: set[int] = set()
            for first, last in ranges:  # each range is a slice of the sorted UID list
                chosen.update(range(bisect_left(uids, first), bisect_right(uids, last)))
            return [(index + 1, uids[index]) for index in sorted(chosen)]
        if not uids and text in ("1:*", "*"):
            return []
        ranges = sequence_set(text, len(uids))
        found: list[tuple[int, int]] = []
        for start, end in ranges:
            if end > len(uids):
                raise _bad("no such message")
            found.extend((seq, uids[seq - 1]) for seq in range(start, end + 1))
        return sorted(set(found))

    def parse_items(self, token: Token) -> list[FetchItem]:
        raw = token if isinstance(token, list) else [token]
        names: list[str] = []
        for item in raw:
            text = _string(item)
            names.extend(FETCH_MACROS.get(text.upper(), [text]))
        items = []
        for text in names:
            upper = text.upper()
            if upper in ("FLAGS", "UID", "RFC822.SIZE", "INTERNALDATE", "ENVELOPE", "BODYSTRUCTURE", "BODY"):
                items.append(FetchItem(name=upper, kind=upper))
            elif upper == "RFC822":
                items.append(FetchItem(name="RFC822", kind="SECTION", section="", peek=False))
            elif upper == "RFC822.HEADER":
                items.append(FetchItem(name="RFC822.HEADER", kind="SECTION", section="HEADER"))
            elif upper == "RFC822.TEXT":
                items.append(FetchItem(name="RFC822.TEXT", kind="SECTION", section="TEXT", peek=False))
            else:
                match = _BODY_ITEM.match(text)
                if not match:
                    raise _bad(f"unknown FETCH item {text[:40]}")
                verb, section = match.group(1).upper(), match.group(2)
                section = re.sub(r"\s+", " ", section.strip())
                section = re.sub(r"^((?:\d+\.)*)([A-Za-z.]+)", lambda m: m.group(1) + m.group(2).upper(), section)
                origin = int(match.group(3)) if match.group(3) is not None else None
                count = int(match.group(4)) if match.group(4) is not None else None
                name = f"BODY[{section}]" + (f"<{origin}>" if origin is not None else "")
                items.append(
                    FetchItem(
                        name=name,
                        kind="SECTION",
                        section=section,
                        peek=verb.endswith("PEEK"),
                        origin=origin,
                        count=count,
                    )
                )
        return items

    async def message_file(self, row: store.Row) -> tuple[IO[bytes], Entity]:
        """The copy the client gets (our Authentication-Results first, forged ones left out)
        and its MIME structure: every section, size and BODYSTRUCTURE is of that copy."""
        cached = self.cache.get(row.cache_key)
        if cached is not None:
            self.cache.move_to_end(row.cache_key)
            return cached

        def load() -> tuple[IO[bytes], Entity]:
            handle = store.message_spooled(row)
            root = parse(handle)
            return handle, root

        loaded = await asyncio.to_thread(load)
        self.cache[row.cache_key] = loaded
        while len(self.cache) > 3:
            _key, (handle, _root) = self.cache.popitem(last=False)
            handle.close()
        return loaded

    async def cmd_fetch(self, args: list[Token], *, by_uid: bool) -> str:
        selected = self.require_selected()
        assert self.access is not None
        if len(args) < 2:
            raise _bad("FETCH set items")
        targets = self.targets(_string(args[0]), by_uid)
        items = self.parse_items(args[1])
        if by_uid and not any(item.kind == "UID" for item in items):
            items.insert(0, FetchItem(name="UID", kind="UID"))
        sets_seen = not selected.readonly and any(item.kind == "SECTION" and not item.peek for item in items)
        if sets_seen and not any(item.kind == "FLAGS" for item in items):
            items.append(FetchItem(name="FLAGS", kind="FLAGS"))
        needs_file = any(item.kind in ("SECTION", "ENVELOPE", "BODYSTRUCTURE", "BODY") for item in items)
        if all(item.kind in ("UID", "FLAGS") for item in items) and not sets_seen:
            await self.fetch_flags(targets, items, selected)
            return f"OK {'UID ' if by_uid else ''}FETCH completed"
        # The whole message and nothing parsed: straight from storage, no MIME scan.
        whole_only = all(
            item.kind in ("UID", "FLAGS", "RFC822.SIZE", "INTERNALDATE")
            or (item.kind == "SECTION" and item.section == "" and item.origin is None)
            for item in items
        )
        size = 20000 if not needs_file else 200
        for start in range(0, len(targets), size):
            batch = targets[start : start + size]
            uids = [uid for _seq, uid in batch]
            if sets_seen:
                await db(store.messages_seen, self.access, selected.mailbox_id, uids)
            light = not needs_file and not any(item.kind == "INTERNALDATE" for item in items)
            rows = await db(store.rows, self.access, selected.mailbox_id, uids, light=light)
            if not needs_file:  # metadata only: one write for the batch
                out = bytearray()
                for seq, uid in batch:
                    row = rows.get(uid)
                    if row is not None:
                        out += self.fetch_metadata(seq, row, items, selected)
                await self.send(bytes(out))
                continue
            for seq, uid in batch:
                row = rows.get(uid)
                if row is None:
                    continue  # expunged by someone else; reported at the next NOOP
                if whole_only and row.size <= store.SPOOL_MEMORY:
                    await self.fetch_whole(seq, row, items, selected)
                else:
                    await self.fetch_one(seq, row, items, needs_file, selected)
        return f"OK {'UID ' if by_uid else ''}FETCH completed"

    async def fetch_flags(self, targets: list[tuple[int, int]], items: list[FetchItem], selected: Selected) -> None:
        """FETCH of UID and FLAGS only (a client's resync of a big folder): one query, one
        write per 20,000 messages, each distinct flag set rendered once."""
        assert self.access is not None
        rendered: dict[tuple[bool, str, bool], bytes] = {}
        for start in range(0, len(targets), 20000):
            batch = targets[start : start + 20000]
            found = await db(store.flag_rows, self.access, selected.mailbox_id, [uid for _seq, uid in batch])
            out = bytearray()
            for seq, uid in batch:
                state = found.get(uid)
                if state is None:
                    continue
                flags = rendered.get(state)
                if flags is None:
                    names = store.flags_of(state[0], json.loads(state[1]) or [], state[2])
                    flags = rendered[state] = " ".join(names).encode()
                parts = [b"UID %d" % uid if item.kind == "UID" else b"FLAGS (" + flags + b")" for item in items]
                out += b"* %d FETCH (" % seq + b" ".join(parts) + b")\r\n"
            await self.send(bytes(out))

    def _metadata_item(self, item: FetchItem, row: store.Row, selected: Selected) -> bytes:
        if item.kind == "UID":
            return b"UID %d" % row.uid
        if item.kind == "FLAGS":
            flags = row.flags()
            return b"FLAGS (" + " ".join(flags).encode() + b")"
        if item.kind == "RFC822.SIZE":
            return b"RFC822.SIZE %d" % row.size
        assert row.received_at is not None
        return b'INTERNALDATE "' + internal_date(row.received_at) + b'"'

    def fetch_metadata(self, seq: int, row: store.Row, items: list[FetchItem], selected: Selected) -> bytes:
        parts = [self._metadata_item(item, row, selected) for item in items]
        return b"* %d FETCH (" % seq + b" ".join(parts) + b")\r\n"

    async def fetch_whole(self, seq: int, row: store.Row, items: list[FetchItem], selected: Selected) -> None:
        """BODY[] / RFC822 of a message that fits in memory: one read, one write."""
        data = await asyncio.to_thread(store.message_whole, row)
        parts = []
        for item in items:
            if item.kind == "SECTION":
                parts.append(item.name.encode() + b" {%d}\r\n" % len(data) + data)
            else:
                parts.append(self._metadata_item(item, row, selected))
        await self.send(b"* %d FETCH (" % seq + b" ".join(parts) + b")\r\n")

    async def fetch_one(
        self, seq: int, row: store.Row, items: list[FetchItem], needs_file: bool, selected: Selected
    ) -> None:
        handle: IO[bytes] | None = None
        root: Entity | None = None
        if needs_file:
            handle, root = await self.message_file(row)
        head = b"* %d FETCH (" % seq
        out: list[bytes] = []
        streams: list[tuple[bytes, int, int]] = []  # (prefix, start, length): ranges of the file
        for item in items:
            if item.kind == "UID":
                out.append(b"UID %d" % row.uid)
            elif item.kind == "FLAGS":
                flags = row.flags()
                out.append(b"FLAGS (" + " ".join(flags).encode() + b")")
            elif item.kind == "RFC822.SIZE":
                out.append(b"RFC822.SIZE %d" % row.size)
            elif item.kind == "INTERNALDATE":
                assert row.received_at is not None
                out.append(b'INTERNALDATE "' + internal_date(row.received_at) + b'"')
            elif item.kind == "ENVELOPE":
                assert root is not None
                out.append(b"ENVELOPE " + envelope(root))
            elif item.kind == "BODYSTRUCTURE":
                assert root is not None
                out.append(b"BODYSTRUCTURE " + bodystructure(root))
            elif item.kind == "BODY":
                assert root is not None
                out.append(b"BODY " + bodystructure(root, extended=False))
            else:
                assert handle is not None and root is not None
                try:
                    kind, entity, names, exclude = section_range(root, item.section)
                except SectionError:
                    out.append(item.name.encode() + b" NIL")
                    continue
                begin, end = section_bounds(kind, entity, row.size)
                if kind == "fields":
                    handle.seek(begin)
                    data = header_fields(handle.read(end - begin), names or [], exclude)
                    data = _partial(data, item.origin, item.count)
                    out.append(item.name.encode() + b" {%d}\r\n" % len(data) + data)
                    continue
                length = end - begin
                if item.origin is not None:
                    begin = min(end, begin + item.origin)
                    length = max(0, end - begin)
                    if item.count is not None:
                        length = min(length, item.count)
                if length <= 256 * 1024:
                    handle.seek(begin)
                    data = handle.read(length)
                    out.append(item.name.encode() + b" {%d}\r\n" % len(data) + data)
                else:
                    streams.append((item.name.encode() + b" {%d}\r\n" % length, begin, length))
                    out.append(b"")  # marks where the stream goes
        if not streams:
            await self.send(head + b" ".join(out) + b")\r\n")
            return
        # Large sections go out in chunks straight from the spooled file.
        assert handle is not None
        pending = iter(streams)
        self.writer.write(head)
        first = True
        for piece in out:
            if not first:
                self.writer.write(b" ")
            first = False
            if piece:
                self.writer.write(piece)
                continue
            prefix, begin, length = next(pending)
            self.writer.write(prefix)
            handle.seek(begin)
            left = length
            while left > 0:
                chunk = handle.read(min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                self.writer.write(chunk)
                metrics.BYTES_SENT.labels("imap").inc(len(chunk))
                await self.writer.drain()
        await self.send(b")\r\n")

    async def cmd_store(self, args: list[Token], *, by_uid: bool) -> str:
        selected = self.require_selected()
        assert self.access is not None
        if len(args) < 3:
            raise _bad("STORE set item flags")
        if selected.readonly:
            raise _no("[READ-ONLY] mailbox is read-only")
        targets = self.targets(_string(args[0]), by_uid)
        what = _string(args[1]).upper()
        match = re.fullmatch(r"([+-]?)FLAGS(\.SILENT)?", what)
        if not match:
            raise _bad("STORE takes FLAGS, +FLAGS or -FLAGS")
        mode, silent = match.group(1), bool(match.group(2))
        flag_tokens = args[2] if isinstance(args[2], list) else args[2:]
        flags = [_string(flag) for flag in flag_tokens]
        flags = [_canonical_flag(flag) for flag in flags]
        uids = [uid for _seq, uid in targets]
        rows = await db(store.flags_store, self.access, selected.mailbox_id, uids, mode, flags)
        if not silent:
            for seq, uid in targets:
                row = rows.get(uid)
                if row is None:
                    continue
                flag_list = row.flags()
                text = b"%d FETCH (" % seq + (b"UID %d " % uid if by_uid else b"")
                await self.untagged(text + b"FLAGS (" + " ".join(flag_list).encode() + b"))")
        return f"OK {'UID ' if by_uid else ''}STORE completed"

    async def cmd_expunge(self, args: list[Token], *, by_uid: bool, silent: bool = False) -> str:
        selected = self.require_selected()
        assert self.access is not None
        if selected.readonly:
            raise _no("[READ-ONLY] mailbox is read-only")
        # Every message marked \\Deleted, by this session or another (the flag is stored).
        scope: list[int] | None = None
        if by_uid:
            if not args:
                raise _bad("UID EXPUNGE set")
            ranges = sequence_set(_string(args[0]), selected.uids[-1] if selected.uids else 0)
            scope = [uid for uid in selected.uids if in_ranges(uid, ranges)]
        removed = set(
            await db(
                store.messages_delete,
                self.access,
                selected.mailbox_id,
                scope,
                reason=store.DELETED_EXPUNGE,
                marked=True,
            )
        )
        for index in range(len(selected.uids) - 1, -1, -1):
            if selected.uids[index] in removed:
                del selected.uids[index]
                if not silent:
                    await self.untagged(b"%d EXPUNGE" % (index + 1))
        return "OK EXPUNGE completed"

    async def cmd_close(self, args: list[Token]) -> str:
        selected = self.require_selected()
        if not selected.readonly:
            await self.cmd_expunge([], by_uid=False, silent=True)
        self.selected = None
        return "OK CLOSE completed"

    async def cmd_unselect(self, args: list[Token]) -> str:
        self.require_selected()
        self.selected = None
        return "OK UNSELECT completed"

    async def cmd_check(self, args: list[Token]) -> str:
        await self.refresh(expunge=True)
        return "OK CHECK completed"

    async def cmd_copy(self, args: list[Token], *, by_uid: bool, move: bool = False) -> str:
        selected = self.require_selected()
        assert self.access is not None
        if len(args) != 2:
            raise _bad("COPY set mailbox")
        if not self.access.can_write or (move and selected.readonly):
            raise _no("[NOPERM] these credentials may not add messages")
        targets = self.targets(_string(args[0]), by_uid)
        destination = self.folder(_string(args[1]))
        rows = await db(store.rows, self.access, selected.mailbox_id, [uid for _seq, uid in targets])
        source_uids, new_uids, validity = [], [], 0
        for _seq, uid in targets:
            row = rows.get(uid)
            if row is None:
                continue
            # The message as it was received: the copy is verified again where it lands.
            content = await asyncio.to_thread(blob_get, row.storage_key)
            validity, new_uid = await db(
                store.message_append, self.access, destination, content, ip=self.ip, tls=self.tls
            )
            flags = [flag for flag in row.flags()]
            if flags:
                await db(store.flags_store, self.access, destination, [new_uid], "+", flags)
            source_uids.append(uid)
            new_uids.append(new_uid)
        code = f"[COPYUID {validity} {_uid_set(source_uids)} {_uid_set(new_uids)}] " if new_uids else ""
        if move:
            if code:
                await self.untagged(f"OK {code}moved".encode())
            removed = set(
                await db(
                    store.messages_delete, self.access, selected.mailbox_id, source_uids, reason=store.DELETED_MOVE
                )
            )
            for index in range(len(selected.uids) - 1, -1, -1):
                if selected.uids[index] in removed:
                    del selected.uids[index]
                    await self.untagged(b"%d EXPUNGE" % (index + 1))
            return "OK MOVE completed"
        if destination == selected.mailbox_id:
            await self.refresh(expunge=False)
        return f"OK {code}COPY completed"

    async def cmd_move(self, args: list[Token], *, by_uid: bool) -> str:
        return await self.cmd_copy(args, by_uid=by_uid, move=True)

    async def cmd_search(self, args: list[Token], *, by_uid: bool) -> str:
        selected = self.require_selected()
        assert self.access is not None
        if len(args) >= 2 and isinstance(args[0], str) and args[0].upper() == "CHARSET":
            args = args[2:]
        rows = await db(store.search_rows, self.access, selected.mailbox_id)
        by_uid_row = {int(row["uid"]): row for row in rows}  # type: ignore[call-overload]
        found = []
        for index, uid in enumerate(selected.uids):
            row = by_uid_row.get(uid)
            if row is not None and _matches(args, row, index + 1, uid, selected):
                found.append(uid if by_uid else index + 1)
        await self.untagged(b"SEARCH" + b"".join(b" %d" % number for number in found))
        return f"OK {'UID ' if by_uid else ''}SEARCH completed"


class _StartTls(Exception):
    pass


def _canonical_flag(flag: str) -> str:
    for known in ("\\Seen", "\\Flagged", "\\Answered", "\\Draft", "\\Deleted", "\\Recent"):
        if flag.lower() == known.lower():
            return known
    return flag


def _uid_set(uids: list[int]) -> str:
    return ",".join(str(uid) for uid in uids)


def _partial(data: bytes, origin: int | None, count: int | None) -> bytes:
    if origin is None:
        return data
    data = data[origin:]
    return data[:count] if count is not None else data


def _matches(criteria: list[Token], row: dict[str, Any], seq: int, uid: int, selected: Selected) -> bool:
    """Whether a message meets every SEARCH key (RFC 3501 section 6.4.4)."""
    keys = list(criteria)
    while keys:
        if not _one(keys, row, seq, uid, selected):
            return False
    return True


def _flags_of(row: dict[str, Any], uid: int, selected: Selected) -> set[str]:
    flags = {"\\Seen"} if row["is_read"] else set()
    for tag in row["tags"] or ():
        flags.add(store.TAG_SYSTEM_FLAGS.get(tag, tag).lower())
    if row["imap_deleted"]:
        flags.add("\\Deleted")
    return {flag.lower() for flag in flags}


def _one(keys: list[Token], row: dict[str, Any], seq: int, uid: int, selected: Selected) -> bool:
    token = keys.pop(0)
    if isinstance(token, list):
        return _matches(token, row, seq, uid, selected)
    key = _string(token).upper()
    flags = _flags_of(row, uid, selected)

    def take() -> str:
        if not keys:
            raise _bad(f"SEARCH {key} needs an argument")
        return _string(keys.pop(0))

    simple = {
        "ALL": True,
        "SEEN": "\\seen" in flags,
        "UNSEEN": "\\seen" not in flags,
        "FLAGGED": "\\flagged" in flags,
        "UNFLAGGED": "\\flagged" not in flags,
        "ANSWERED": "\\answered" in flags,
        "UNANSWERED": "\\answered" not in flags,
        "DELETED": "\\deleted" in flags,
        "UNDELETED": "\\deleted" not in flags,
        "DRAFT": "\\draft" in flags,
        "UNDRAFT": "\\draft" not in flags,
        "RECENT": False,
        "NEW": False,
        "OLD": True,
    }
    if key in simple:
        return bool(simple[key])
    if key == "NOT":
        return not _one(keys, row, seq, uid, selected)
    if key == "OR":
        left = _one(keys, row, seq, uid, selected)
        right = _one(keys, row, seq, uid, selected)
        return left or right
    if key == "KEYWORD":
        return take().lower() in flags
    if key == "UNKEYWORD":
        return take().lower() not in flags
    if key == "UID":
        return in_ranges(uid, sequence_set(take(), selected.uids[-1] if selected.uids else 0))
    if key in ("LARGER", "SMALLER"):
        size = int(take())
        return row["size"] > size if key == "LARGER" else row["size"] < size
    if key in ("SINCE", "BEFORE", "ON", "SENTSINCE", "SENTBEFORE", "SENTON"):
        day = parse_date(take())
        moment = row["date"] if key.startswith("SENT") else row["received_at"]
        if moment is None:
            return False
        if key.endswith("SINCE"):
            return bool(moment >= day)
        if key.endswith("BEFORE"):
            return bool(moment < day)
        return bool(day <= moment < day + timedelta(days=1))
    if key in ("FROM", "TO", "CC", "BCC", "SUBJECT", "BODY", "TEXT"):
        needle = take().lower()
        haystack = {
            "FROM": f"{row['from_name']} {row['from_address']}",
            "TO": row["recipients_text"],
            "CC": row["recipients_text"],
            "BCC": "",
            "SUBJECT": row["subject"],
            "BODY": row["text"],
            "TEXT": f"{row['subject']} {row['from_address']} {row['recipients_text']} {row['text']}",
        }[key]
        return needle in (haystack or "").lower()
    if key == "HEADER":
        name, needle = take().lower(), take().lower()
        value = {"subject": row["subject"], "from": row["from_address"], "to": row["recipients_text"]}.get(name, "")
        return needle in (value or "").lower()
    if re.fullmatch(r"[0-9*:,]+", key):
        return in_ranges(seq, sequence_set(key, len(selected.uids)))
    raise _bad(f"unsupported SEARCH key {key[:30]}")


_COMMANDS: dict[str, tuple[str, str]] = {
    "CAPABILITY": ("cmd_capability", "any"),
    "NOOP": ("cmd_noop", "any"),
    "LOGOUT": ("cmd_logout", "any"),
    "ID": ("cmd_id", "any"),
    "STARTTLS": ("cmd_starttls", "any-no-auth"),
    "LOGIN": ("cmd_login", "any-no-auth"),
    "AUTHENTICATE": ("cmd_authenticate", "any-no-auth"),
    "ENABLE": ("cmd_enable", "auth"),
    "NAMESPACE": ("cmd_namespace", "auth"),
    "LIST": ("cmd_list", "auth"),
    "LSUB": ("cmd_lsub", "auth"),
    "SUBSCRIBE": ("cmd_subscribe", "auth"),
    "UNSUBSCRIBE": ("cmd_unsubscribe", "auth"),
    "CREATE": ("cmd_create", "auth"),
    "DELETE": ("cmd_create", "auth"),
    "RENAME": ("cmd_create", "auth"),
    "STATUS": ("cmd_status", "auth"),
    "SELECT": ("cmd_select", "auth"),
    "EXAMINE": ("cmd_examine", "auth"),
    "APPEND": ("cmd_append", "auth"),
    "IDLE": ("cmd_idle", "auth"),
    "CHECK": ("cmd_check", "selected"),
    "CLOSE": ("cmd_close", "selected"),
    "UNSELECT": ("cmd_unselect", "selected"),
    "EXPUNGE": ("cmd_expunge", "selected"),
    "SEARCH": ("cmd_search", "selected"),
    "FETCH": ("cmd_fetch", "selected"),
    "STORE": ("cmd_store", "selected"),
    "COPY": ("cmd_copy", "selected"),
    "MOVE": ("cmd_move", "selected"),
}


async def handle_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, options: ImapOptions) -> None:
    """One client: the per-IP limit, then the session (STARTTLS restarts it on the same socket)."""
    peer = writer.get_extra_info("peername") or ("", 0)
    proceed, ip = await client_address(reader, peer[0] if peer else None)
    if not proceed:
        metrics.CONNECTIONS_REFUSED.labels("imap", "proxy").inc()
        await _close(writer)
        return
    slot = options.limits.take_ip(ip)
    if slot is None:
        metrics.CONNECTIONS_REFUSED.labels("imap", "per_ip").inc()
        writer.write(b"* BYE too many connections from your address\r\n")
        await _close(writer)
        return
    metrics.CONNECTIONS_OPEN.labels("imap").inc()
    try:
        session = ImapSession(reader, writer, options)
        session.ip = ip
        # What the session does is audited as from the client's address (after PROXY), one
        # correlation id a connection; db() carries the context into its worker threads.
        with audit_context.bind(ip=ip, user_agent="imap", correlation_id=audit_context.new_correlation_id()):
            await session.run()
    finally:
        metrics.CONNECTIONS_OPEN.labels("imap").dec()
        options.limits.release_ip(slot)
        await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5)
    except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
        pass
