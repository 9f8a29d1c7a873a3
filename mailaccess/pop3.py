"""A POP3 server (RFC 1939, CAPA RFC 2449, STLS RFC 2595, AUTH PLAIN RFC 5034) over one mailbox.

The maildrop is the login's mailbox as it was at PASS; messages marked with DELE are
soft-deleted through the API's service when the client QUITs (the UPDATE state). The
unique-id of UIDL is ``<UIDVALIDITY>.<UID>``, stable across sessions.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import ssl
from dataclasses import dataclass, field

from django.conf import settings

from audit import context as audit_context
from mailaccess import metrics, store
from mailaccess.auth import Access, LoginRefused, login
from mailaccess.limits import ConnectionLimits, client_address, is_loopback
from mailboxes.waiting import db

logger = logging.getLogger(__name__)


@dataclass
class Pop3Options:
    tls_context: ssl.SSLContext | None
    implicit_tls: bool = False
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    timeout: float = 600.0  # RFC 1939 section 3: at least ten minutes


@dataclass
class Drop:
    uid_validity: int
    rows: list[store.Row]
    deleted: set[int] = field(default_factory=set)  # message numbers (1-based)


class Pop3Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, options: Pop3Options) -> None:
        self.reader, self.writer, self.options = reader, writer, options
        peer = writer.get_extra_info("peername") or ("", 0)
        self.ip: str | None = peer[0] if peer else None
        self.tls = options.implicit_tls
        self.user: str | None = None
        self.access: Access | None = None
        self.drop: Drop | None = None
        self.key_slot: str | None = None

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        metrics.BYTES_SENT.labels("pop3").inc(len(data))
        await self.writer.drain()

    async def reply(self, text: str) -> None:
        await self.send(text.encode() + b"\r\n")

    def plaintext_ok(self) -> bool:
        return self.tls or is_loopback(self.ip) or settings.MAILACCESS_ALLOW_PLAINTEXT

    async def run(self) -> None:
        metrics.CONNECTIONS.labels("pop3").inc()
        try:
            await self.reply("+OK mailplatform POP3 ready")
            while True:
                try:
                    line = await asyncio.wait_for(self.reader.readuntil(b"\n"), self.options.timeout)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    break
                words = line.decode("utf-8", "replace").rstrip("\r\n").split(" ")
                command, args = words[0].upper(), words[1:]
                metrics.COMMANDS.labels("pop3", command if command in _COMMANDS else "other").inc()
                if command not in _COMMANDS:
                    await self.reply("-ERR unknown command")
                    continue
                if not await getattr(self, f"cmd_{command.lower()}")(args):
                    break
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass
        except Exception:
            logger.exception("POP3 session failed")
        finally:
            if self.key_slot is not None:
                self.options.limits.release_key(self.key_slot)

    # --- AUTHORIZATION --------------------------------------------------------------------
    async def cmd_capa(self, args: list[str]) -> bool:
        lines = ["+OK capability list follows", "TOP", "UIDL", "USER", "RESP-CODES", "AUTH-RESP-CODE", "SASL PLAIN"]
        if self.options.tls_context is not None and not self.tls:
            lines.append("STLS")
        lines += ["IMPLEMENTATION mailplatform", "."]
        await self.send("\r\n".join(lines).encode() + b"\r\n")
        return True

    async def cmd_stls(self, args: list[str]) -> bool:
        if self.options.tls_context is None or self.tls or self.access is not None:
            await self.reply("-ERR STLS not available")
            return True
        await self.reply("+OK begin TLS negotiation")
        await self.writer.start_tls(self.options.tls_context)
        self.tls = True
        return True

    async def cmd_user(self, args: list[str]) -> bool:
        if self.access is not None:
            await self.reply("-ERR already logged in")
        elif not self.plaintext_ok():
            await self.reply("-ERR [AUTH] use STLS first")
        elif not args:
            await self.reply("-ERR USER name")
        else:
            self.user = args[0]
            await self.reply("+OK send PASS")
        return True

    async def cmd_pass(self, args: list[str]) -> bool:
        if self.access is not None or self.user is None:
            await self.reply("-ERR USER first")
            return True
        return await self.sign_in(self.user, " ".join(args))

    async def cmd_auth(self, args: list[str]) -> bool:
        if not args:
            await self.reply("+OK\r\nPLAIN\r\n.")
            return True
        if args[0].upper() != "PLAIN" or self.access is not None:
            await self.reply("-ERR only AUTH PLAIN")
            return True
        if not self.plaintext_ok():
            await self.reply("-ERR [AUTH] use STLS first")
            return True
        if len(args) > 1:
            response = args[1]
        else:
            await self.send(b"+ \r\n")
            response = (await self.reader.readuntil(b"\n")).decode("ascii", "replace").strip()
        try:
            _authzid, user, password = base64.b64decode(response, validate=True).decode().split("\x00")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            await self.reply("-ERR invalid PLAIN response")
            return True
        return await self.sign_in(user, password)

    async def sign_in(self, user: str, password: str) -> bool:
        try:
            access = await db(login, username=user, password=password, ip=self.ip, protocol="pop3")
        except LoginRefused as refused:
            self.user = None
            if refused.code == "rate_limited":
                await self.reply("-ERR [LOGIN-DELAY] too many failed logins, try later")
            else:
                await self.reply("-ERR [AUTH] invalid credentials")
            return True
        slot = self.options.limits.take_key(access.principal.pk)
        if slot is None:
            await self.reply("-ERR [IN-USE] too many connections for these credentials")
            return True
        self.key_slot = slot
        mailbox_id = access.mailboxes["INBOX"]
        uids = await db(store.folder_uids, access, mailbox_id)
        rows = await db(store.rows, access, mailbox_id, uids)
        validity, _next = await db(store.mailbox_uid_state, mailbox_id)
        self.access = access
        self.drop = Drop(uid_validity=validity, rows=[rows[uid] for uid in uids if uid in rows])
        await self.reply(f"+OK {len(self.drop.rows)} messages")
        return True

    async def cmd_quit(self, args: list[str]) -> bool:
        drop, access = self.drop, self.access
        if drop is not None and access is not None and drop.deleted:
            uids = [drop.rows[number - 1].uid for number in sorted(drop.deleted)]
            await db(store.messages_delete, access, access.mailboxes["INBOX"], uids, reason=store.DELETED_DELE)
        await self.reply("+OK bye")
        return False

    # --- TRANSACTION ----------------------------------------------------------------------
    def message(self, args: list[str]) -> tuple[int, store.Row] | None:
        drop = self.drop
        if drop is None or not args or not args[0].isdigit():
            return None
        number = int(args[0])
        if not 1 <= number <= len(drop.rows) or number in drop.deleted:
            return None
        return number, drop.rows[number - 1]

    async def transaction_state(self) -> bool:
        if self.drop is None:
            await self.reply("-ERR log in first")
            return False
        return True

    async def cmd_stat(self, args: list[str]) -> bool:
        if await self.transaction_state():
            assert self.drop is not None
            live = [row for number, row in enumerate(self.drop.rows, 1) if number not in self.drop.deleted]
            await self.reply(f"+OK {len(live)} {sum(row.size for row in live)}")
        return True

    async def _listing(self, args: list[str], value: str) -> None:
        assert self.drop is not None
        if args:
            found = self.message(args)
            if found is None:
                await self.reply("-ERR no such message")
                return
            number, row = found
            await self.reply(f"+OK {number} {self._value(row, value)}")
            return
        lines = ["+OK"]
        for number, row in enumerate(self.drop.rows, 1):
            if number not in self.drop.deleted:
                lines.append(f"{number} {self._value(row, value)}")
        lines.append(".")
        await self.send("\r\n".join(lines).encode() + b"\r\n")

    def _value(self, row: store.Row, value: str) -> str:
        assert self.drop is not None
        return str(row.size) if value == "size" else f"{self.drop.uid_validity}.{row.uid}"

    async def cmd_list(self, args: list[str]) -> bool:
        if await self.transaction_state():
            await self._listing(args, "size")
        return True

    async def cmd_uidl(self, args: list[str]) -> bool:
        if await self.transaction_state():
            await self._listing(args, "uid")
        return True

    async def cmd_retr(self, args: list[str]) -> bool:
        if await self.transaction_state():
            await self._send_message(args, None)
        return True

    async def cmd_top(self, args: list[str]) -> bool:
        if await self.transaction_state():
            if len(args) != 2 or not args[1].isdigit():
                await self.reply("-ERR TOP msg n")
            else:
                await self._send_message(args[:1], int(args[1]))
        return True

    async def _send_message(self, args: list[str], body_lines: int | None) -> None:
        found = self.message(args)
        if found is None:
            await self.reply("-ERR no such message")
            return
        _number, row = found
        # The copy a client gets (our Authentication-Results first, forged ones left out):
        # LIST, STAT and this octet count are of it too.
        handle = await asyncio.to_thread(store.message_spooled, row)
        try:
            await self.reply(f"+OK {row.size} octets")
            in_body, left, last = False, body_lines, b"\r\n"
            buffer = bytearray()
            while True:
                line = handle.readline(64 * 1024)
                if not line:
                    break
                if in_body and left is not None:
                    if left <= 0:
                        break
                    left -= 1
                if not in_body and line in (b"\r\n", b"\n"):
                    in_body = True
                if line.startswith(b"."):  # byte-stuffing, RFC 1939 section 3
                    buffer += b"."
                buffer += line
                last = line
                if len(buffer) >= 64 * 1024:
                    await self.send(bytes(buffer))
                    buffer.clear()
            if not last.endswith(b"\n"):
                buffer += b"\r\n"
            buffer += b".\r\n"
            await self.send(bytes(buffer))
        finally:
            handle.close()

    async def cmd_dele(self, args: list[str]) -> bool:
        if await self.transaction_state():
            assert self.access is not None and self.drop is not None
            found = self.message(args)
            if found is None:
                await self.reply("-ERR no such message")
            elif not self.access.can_write:
                await self.reply("-ERR these credentials may not delete messages")
            else:
                self.drop.deleted.add(found[0])
                await self.reply(f"+OK message {found[0]} deleted")
        return True

    async def cmd_rset(self, args: list[str]) -> bool:
        if await self.transaction_state():
            assert self.drop is not None
            self.drop.deleted.clear()
            await self.reply("+OK")
        return True

    async def cmd_noop(self, args: list[str]) -> bool:
        if await self.transaction_state():
            await self.reply("+OK")
        return True


_COMMANDS = {
    "CAPA",
    "STLS",
    "USER",
    "PASS",
    "AUTH",
    "QUIT",
    "STAT",
    "LIST",
    "UIDL",
    "RETR",
    "TOP",
    "DELE",
    "RSET",
    "NOOP",
}


async def handle_pop3(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, options: Pop3Options) -> None:
    peer = writer.get_extra_info("peername") or ("", 0)
    proceed, ip = await client_address(reader, peer[0] if peer else None)
    slot = options.limits.take_ip(ip) if proceed else None
    if not proceed:
        metrics.CONNECTIONS_REFUSED.labels("pop3", "proxy").inc()
    elif slot is None:
        metrics.CONNECTIONS_REFUSED.labels("pop3", "per_ip").inc()
        writer.write(b"-ERR [IN-USE] too many connections from your address\r\n")
    else:
        metrics.CONNECTIONS_OPEN.labels("pop3").inc()
        try:
            session = Pop3Session(reader, writer, options)
            session.ip = ip
            # Audited as from the client's address, one correlation id a connection (see IMAP's).
            with audit_context.bind(ip=ip, user_agent="pop3", correlation_id=audit_context.new_correlation_id()):
                await session.run()
        finally:
            metrics.CONNECTIONS_OPEN.labels("pop3").dec()
            options.limits.release_ip(slot)
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5)
    except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
        pass
