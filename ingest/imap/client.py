"""A small asyncio IMAP4rev1 client: what a pull connector needs, nothing more.

One coroutine-driven connection per account, no thread: a runner holds a thousand IDLE
accounts in one process at a few tens of KiB each (an asyncio stream, a task and a parser
state), where a thread per account would cost a stack each and a library built on blocking
sockets (imaplib, imapclient) one thread per IDLE. The commands used: CAPABILITY, STARTTLS
(RFC 3501 section 6.2.1), LOGIN, AUTHENTICATE XOAUTH2 / OAUTHBEARER (RFC 7628), LIST,
EXAMINE (read-only, section 6.3.2: nothing is marked read), UID SEARCH, UID FETCH
``BODY.PEEK[]`` (section 6.4.5: PEEK does not set ``\\Seen``), IDLE (RFC 2177), LOGOUT.

The connection goes to an address resolved and checked once (``mailplatform.transport``
rules, see :func:`connect`), while TLS SNI and the certificate check keep the host name.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

LINE_LIMIT = 64 * 1024  # a response line outside literals (RFC 3501 has no limit; servers do)
_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
_TAGGED = re.compile(rb"^(\S+) (OK|NO|BAD)\b ?(.*)$", re.IGNORECASE | re.DOTALL)
_CODE = re.compile(rb"^\[([^\]]*)\]")
_FETCH_UID = re.compile(rb"\bUID (\d+)")
_EXISTS = re.compile(rb"^\* (\d+) EXISTS", re.IGNORECASE)
_EXPUNGE = re.compile(rb"^\* \d+ EXPUNGE", re.IGNORECASE)
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)


class ImapError(Exception):
    """The server refused a command, or the connection failed; ``kind`` names the failure."""

    kind = "protocol"

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class ImapAuthFailed(ImapError):
    """The credentials were refused (``[AUTHENTICATIONFAILED]`` or a NO to LOGIN/AUTHENTICATE)."""

    kind = "auth_failed"


class ImapConnectError(ImapError):
    kind = "connect"


class ImapTimeout(ImapError):
    kind = "timeout"


class ImapTlsError(ImapError):
    kind = "tls"


@dataclass
class Response:
    """A command's outcome: the tagged status, its text and code, the untagged lines before it."""

    status: str
    text: str
    code: str = ""
    untagged: list[bytes] = field(default_factory=list)
    literals: list[tuple[bytes, bytes]] = field(default_factory=list)  # (line before, literal)


@dataclass
class FolderStatus:
    """What EXAMINE said about a folder (RFC 3501 section 6.3.1)."""

    exists: int = 0
    uid_validity: int = 0
    uid_next: int = 0


def _keepalive(sock: socket.socket) -> None:
    """TCP keepalive: a dead peer is noticed within about a minute even while idle."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def quote(text: str) -> bytes:
    """An IMAP quoted string (RFC 3501 section 4.3); refuses what cannot be quoted."""
    if any(ch in text for ch in "\r\n\0"):
        raise ValueError("line breaks and NUL cannot be sent in a quoted string")
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return b'"' + escaped.encode("utf-8") + b'"'


def xoauth2_payload(username: str, access_token: str) -> bytes:
    """The XOAUTH2 initial response (Google's and Microsoft's SASL mechanism)."""
    return base64.b64encode(f"user={username}\x01auth=Bearer {access_token}\x01\x01".encode())


def oauthbearer_payload(username: str, access_token: str, host: str, port: int) -> bytes:
    """The OAUTHBEARER initial response (RFC 7628 section 3.1)."""
    gs2 = f"n,a={username.replace('=', '=3D').replace(',', '=2C')},"
    return base64.b64encode(f"{gs2}\x01host={host}\x01port={port}\x01auth=Bearer {access_token}\x01\x01".encode())


class ImapClient:
    """One IMAP connection. Every method raises :class:`ImapError` (or a subclass) on failure."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        host: str,
        port: int,
        timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host
        self.port = port
        self.timeout = timeout
        self.capabilities: set[str] = set()
        self._tag = 0
        self.idling = False
        # An untagged EXISTS in any command's answer (RFC 3501 section 7: the server may send
        # it with any response): mail that arrived while we were fetching. The server will
        # not announce it again in the next IDLE, so the caller looks again first.
        self.new_mail_seen = False
        # The folder opened by the last EXAMINE and its message count as the server's
        # untagged EXISTS / EXPUNGE answers keep it: a caller holding the folder's cursor
        # may look for new UIDs without opening it again. None when nothing is open, or
        # once the server announced another UIDVALIDITY (the old UIDs mean nothing).
        self.selected: str | None = None
        self.exists = 0

    def _untagged_note(self, line: bytes) -> None:
        """What an untagged line says about the open folder (RFC 3501 section 7.3, 7.4.1)."""
        if match := _EXISTS.match(line):
            self.exists = int(match.group(1))
            self.new_mail_seen = True
        elif _EXPUNGE.match(line):
            self.exists = max(0, self.exists - 1)
        elif line.startswith(b"* OK") and _UIDVALIDITY.search(line):
            self.selected = None

    # --- lines ---------------------------------------------------------------------
    async def _readline(self, timeout: float | None = None) -> bytes:
        try:
            line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout or self.timeout)
        except asyncio.LimitOverrunError:
            raise ImapError("response line too long") from None
        except asyncio.IncompleteReadError:
            raise ImapConnectError("connection closed by the server") from None
        except TimeoutError:
            raise ImapTimeout(f"no answer within {timeout or self.timeout:g}s") from None
        except OSError as exc:
            raise ImapConnectError(f"connection lost: {type(exc).__name__}") from None
        return line

    async def _read_response_line(self, timeout: float | None = None) -> tuple[bytes, list[bytes]]:
        """One logical response line, with the literals it carries (``{n}`` then n bytes)."""
        line = await self._readline(timeout)
        parts = [line]
        literals: list[bytes] = []
        while match := _LITERAL.search(line):
            size = int(match.group(1))
            try:
                literal = await asyncio.wait_for(self.reader.readexactly(size), max(self.timeout, 60.0))
            except asyncio.IncompleteReadError:
                raise ImapConnectError("connection closed inside a literal") from None
            except TimeoutError:
                raise ImapTimeout("literal not received in time") from None
            literals.append(literal)
            line = await self._readline()
            parts.append(line)
        return b"".join(parts), literals

    async def _send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except TimeoutError:
            raise ImapTimeout("could not send in time") from None
        except OSError as exc:
            raise ImapConnectError(f"connection lost: {type(exc).__name__}") from None

    async def greeting(self) -> None:
        line, _ = await self._read_response_line()
        if line.upper().startswith(b"* BYE"):
            raise ImapConnectError(f"server refused the connection: {line[6:].decode(errors='replace').strip()}")
        if not line.upper().startswith((b"* OK", b"* PREAUTH")):
            raise ImapError("not an IMAP server")
        self._capabilities_from(line)

    def _capabilities_from(self, line: bytes) -> None:
        text = line.decode("ascii", "replace")
        match = re.search(r"\[CAPABILITY ([^\]]*)\]", text, re.IGNORECASE)
        if match:
            self.capabilities = {word.upper() for word in match.group(1).split()}

    async def command(
        self,
        text: bytes,
        *,
        continuation: Callable[[bytes], bytes] | None = None,
        on_literal: Callable[[bytes, bytes], None] | None = None,
    ) -> Response:
        """Send one tagged command and read to its tagged answer."""
        self._tag += 1
        tag = f"A{self._tag:04d}".encode()
        await self._send(tag + b" " + text + b"\r\n")
        untagged: list[bytes] = []
        literals: list[tuple[bytes, bytes]] = []
        while True:
            line, carried = await self._read_response_line()
            if line.startswith(b"+"):
                reply = continuation(line) if continuation else b"*"
                await self._send(reply + b"\r\n")
                continue
            if line.startswith(b"* "):
                if carried and on_literal is not None:
                    on_literal(line, carried[-1])
                elif carried:
                    literals.append((line, carried[-1]))
                else:
                    untagged.append(line.rstrip(b"\r\n"))
                    self._untagged_note(line)
                if line.upper().startswith(b"* BYE"):
                    pass  # the tagged answer (or the close) follows
                continue
            match = _TAGGED.match(line.rstrip(b"\r\n"))
            if match is None or match.group(1) != tag:
                continue  # a stray line; RFC 3501 section 7 allows untagged data anywhere
            status = match.group(2).decode().upper()
            rest = match.group(3)
            code_match = _CODE.match(rest)
            code = code_match.group(1).decode("ascii", "replace") if code_match else ""
            return Response(status, rest.decode("utf-8", "replace"), code, untagged, literals)

    async def ok(self, text: bytes, **kwargs: object) -> Response:
        response = await self.command(text, **kwargs)  # type: ignore[arg-type]
        if response.status != "OK":
            raise ImapError(f"{text.split(b' ', 1)[0].decode()} refused: {response.text[:200]}", code=response.code)
        return response

    # --- session -------------------------------------------------------------------
    async def capability(self) -> set[str]:
        response = await self.ok(b"CAPABILITY")
        for line in response.untagged:
            if line.upper().startswith(b"* CAPABILITY "):
                self.capabilities = {word.upper() for word in line[13:].decode("ascii", "replace").split()}
        return self.capabilities

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        if "STARTTLS" not in self.capabilities:
            await self.capability()
        if "STARTTLS" not in self.capabilities:
            raise ImapTlsError("the server does not offer STARTTLS")
        await self.ok(b"STARTTLS")
        try:
            await asyncio.wait_for(self.writer.start_tls(context, server_hostname=server_hostname), self.timeout)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise ImapTlsError(f"TLS failed: {exc}"[:300]) from None
        except TimeoutError:
            raise ImapTimeout("TLS handshake timed out") from None
        self.capabilities = set()
        await self.capability()  # RFC 3501 section 6.2.1: capabilities may change

    def _auth_failure(self, response: Response) -> ImapError:
        message = f"login refused: {response.text[:200]}"
        # RFC 5530: only these codes say the credentials are wrong; UNAVAILABLE is transient.
        if response.code.upper() in {"AUTHENTICATIONFAILED", "AUTHORIZATIONFAILED", "EXPIRED"} or not response.code:
            return ImapAuthFailed(message, code=response.code)
        return ImapError(message, code=response.code)

    async def login(self, username: str, password: str) -> None:
        if "LOGINDISABLED" in self.capabilities:
            raise ImapAuthFailed("the server refuses LOGIN on this connection (LOGINDISABLED)")
        response = await self.command(b"LOGIN " + quote(username) + b" " + quote(password))
        if response.status != "OK":
            raise self._auth_failure(response)
        if not self._capabilities_from_text(response.text):
            await self.capability()

    def _capabilities_from_text(self, text: str) -> bool:
        match = re.search(r"\[CAPABILITY ([^\]]*)\]", text, re.IGNORECASE)
        if match:
            self.capabilities = {word.upper() for word in match.group(1).split()}
        return bool(match)

    async def authenticate_oauth(self, mechanism: str, username: str, access_token: str) -> None:
        """XOAUTH2 or OAUTHBEARER with the initial response (SASL-IR, RFC 4959) when offered."""
        mechanism = mechanism.upper()
        if mechanism == "XOAUTH2":
            payload = xoauth2_payload(username, access_token)
        else:
            payload = oauthbearer_payload(username, access_token, self.host, self.port)
        # On failure the server sends a challenge with the error JSON; answer it with an
        # empty line (RFC 7628 section 3.2.3) to get the tagged NO.
        sent = {"payload": False}

        def continuation(line: bytes) -> bytes:
            if not sent["payload"]:
                sent["payload"] = True
                return payload
            return b""

        if "SASL-IR" in self.capabilities:
            sent["payload"] = True
            response = await self.command(
                b"AUTHENTICATE " + mechanism.encode() + b" " + payload, continuation=continuation
            )
        else:
            response = await self.command(b"AUTHENTICATE " + mechanism.encode(), continuation=continuation)
        if response.status != "OK":
            raise self._auth_failure(response)
        if not self._capabilities_from_text(response.text):
            await self.capability()

    async def list_folders(self) -> list[str]:
        response = await self.ok(b'LIST "" "*"')
        names: list[str] = []
        for line in response.untagged:
            if line.upper().startswith(b"* LIST "):
                names.append(_list_name(line))
        for line, literal in response.literals:
            if line.upper().startswith(b"* LIST "):
                names.append(literal.decode("utf-8", "replace"))
        return names

    async def examine(self, folder: str) -> FolderStatus:
        """Select ``folder`` read-only (EXAMINE): FETCH BODY.PEEK[] then changes nothing."""
        self.selected = None
        response = await self.command(b"EXAMINE " + quote(folder))
        if response.status != "OK":
            raise ImapError(f"cannot open folder {folder!r}: {response.text[:200]}", code=response.code)
        self.new_mail_seen = False  # EXAMINE's own EXISTS is the folder's size, not news
        self.selected = folder
        status = FolderStatus()
        for line in response.untagged:
            upper = line.upper()
            if match := _EXISTS.match(line):
                status.exists = int(match.group(1))
            elif b"[UIDVALIDITY " in upper:
                status.uid_validity = int(re.search(rb"\[UIDVALIDITY (\d+)\]", upper).group(1))  # type: ignore[union-attr]
            elif b"[UIDNEXT " in upper:
                status.uid_next = int(re.search(rb"\[UIDNEXT (\d+)\]", upper).group(1))  # type: ignore[union-attr]
        self.exists = status.exists
        return status

    async def uid_search_from(self, first_uid: int) -> list[int]:
        """UIDs at or above ``first_uid`` (``UID SEARCH UID n:*``; ``*`` alone may answer the last)."""
        response = await self.ok(b"UID SEARCH UID %d:*" % first_uid)
        uids: list[int] = []
        for line in response.untagged:
            if line.upper().startswith(b"* SEARCH"):
                uids.extend(int(word) for word in line[8:].split() if word.isdigit())
        return sorted(uid for uid in uids if uid >= first_uid)

    async def uid_of_sequence(self, number: int) -> int:
        """The UID of message sequence number ``number`` (for the initial window)."""
        response = await self.ok(b"FETCH %d (UID)" % number)
        for line in response.untagged:
            if match := _FETCH_UID.search(line):
                return int(match.group(1))
        raise ImapError(f"no UID for message {number}")

    async def uid_sizes(self, uids: list[int]) -> dict[int, int]:
        """RFC822.SIZE of each UID, to skip what is too large before downloading it."""
        return await self._sizes(_uid_set(uids))

    async def uid_sizes_from(self, first_uid: int) -> dict[int, int]:
        """RFC822.SIZE of every UID at or above ``first_uid``: new mail and its sizes in one
        round trip (``UID FETCH n:*``; ``*`` alone may answer the last message, left out)."""
        sizes = await self._sizes(b"%d:*" % first_uid)
        return {uid: size for uid, size in sizes.items() if uid >= first_uid}

    async def _sizes(self, uid_set: bytes) -> dict[int, int]:
        response = await self.ok(b"UID FETCH " + uid_set + b" (UID RFC822.SIZE)")
        sizes: dict[int, int] = {}
        for line in response.untagged:
            uid = _FETCH_UID.search(line)
            size = re.search(rb"RFC822\.SIZE (\d+)", line)
            if uid and size:
                sizes[int(uid.group(1))] = int(size.group(1))
        return sizes

    async def uid_fetch_bodies(self, uids: list[int]) -> list[tuple[int, bytes]]:
        """The raw bytes of each UID, fetched with BODY.PEEK[] (no flag changes)."""
        found: list[tuple[int, bytes]] = []

        def on_literal(line: bytes, literal: bytes) -> None:
            match = _FETCH_UID.search(line)
            if match:
                found.append((int(match.group(1)), literal))

        response = await self.command(b"UID FETCH " + _uid_set(uids) + b" (UID BODY.PEEK[])", on_literal=on_literal)
        if response.status != "OK":
            raise ImapError(f"FETCH refused: {response.text[:200]}", code=response.code)
        # A UID after the literal (``BODY[] {n}...  UID 5)``) is on the closing line.
        return sorted(found)

    async def idle(self, *, timeout: float) -> bool:
        """IDLE until the server reports new mail (EXISTS) or ``timeout``; True on new mail.

        RFC 2177: the client re-issues IDLE at least every 29 minutes; ``timeout`` is kept
        below that by the caller. DONE ends it, and the tagged OK is read.
        """
        self._tag += 1
        tag = f"A{self._tag:04d}".encode()
        await self._send(tag + b" IDLE\r\n")
        line = await self._readline()
        if not line.startswith(b"+"):
            raise ImapError(f"IDLE refused: {line[:200].decode(errors='replace').strip()}")
        self.idling = True
        new_mail = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while not new_mail:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), remaining)
                except TimeoutError:
                    break
                except asyncio.IncompleteReadError:
                    raise ImapConnectError("connection closed by the server during IDLE") from None
                except OSError as exc:
                    raise ImapConnectError(f"connection lost: {type(exc).__name__}") from None
                self._untagged_note(line)
                if _EXISTS.match(line):
                    new_mail = True
                elif line.upper().startswith(b"* BYE"):
                    raise ImapConnectError(f"server closed the session: {line[6:].decode(errors='replace').strip()}")
            await self._send(b"DONE\r\n")
            while True:
                line, _ = await self._read_response_line()
                self._untagged_note(line)
                if _EXISTS.match(line):
                    new_mail = True
                if line.startswith(tag + b" "):
                    break
        finally:
            self.idling = False
        return new_mail

    async def noop(self) -> bool:
        """NOOP; True when the server reported new messages meanwhile."""
        response = await self.ok(b"NOOP")
        return any(_EXISTS.match(line) for line in response.untagged)

    async def logout(self) -> None:
        try:
            if not self.writer.is_closing():
                await asyncio.wait_for(self.command(b"LOGOUT"), 2)
        except (ImapError, TimeoutError, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.close()


def _uid_set(uids: list[int]) -> bytes:
    return b",".join(str(uid).encode() for uid in uids)


def _list_name(line: bytes) -> str:
    """The mailbox name of a ``* LIST (flags) "delim" name`` line."""
    text = line.decode("utf-8", "replace").rstrip("\r\n")
    match = re.match(r'\* LIST \([^)]*\) (?:"(?:[^"\\]|\\.)*"|NIL) (.*)$', text, re.IGNORECASE)
    name = match.group(1) if match else text.rsplit(" ", 1)[-1]
    if name.startswith('"') and name.endswith('"'):
        name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return name


def tls_context(*, verify: bool = True, ca_file: str = "") -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def connect(
    *,
    host: str,
    address: str,
    port: int,
    tls_mode: str,
    timeout: float,
    context: ssl.SSLContext | None = None,
) -> ImapClient:
    """Open a connection to the pinned ``address``; TLS SNI and the certificate use ``host``.

    ``tls_mode``: "implicit" (TLS from the first byte), "starttls" (upgrade before any
    credential is sent) or "none" (plaintext, where the caller allowed it).
    """
    context = context or tls_context()
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        _keepalive(sock)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, (address, port)), timeout)
    except TimeoutError:
        sock.close()
        raise ImapTimeout(f"connect to {host}:{port} timed out") from None
    except OSError as exc:
        sock.close()
        raise ImapConnectError(f"cannot connect to {host}:{port}: {exc.strerror or type(exc).__name__}") from None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                sock=sock,
                ssl=context if tls_mode == "implicit" else None,
                server_hostname=host if tls_mode == "implicit" else None,
                limit=LINE_LIMIT,
            ),
            timeout,
        )
    except (ssl.SSLError, ssl.CertificateError) as exc:
        sock.close()
        raise ImapTlsError(f"TLS failed: {exc}"[:300]) from None
    except TimeoutError:
        sock.close()
        raise ImapTimeout("TLS handshake timed out") from None
    except OSError as exc:
        sock.close()
        raise ImapConnectError(f"cannot connect to {host}:{port}: {type(exc).__name__}") from None
    client = ImapClient(reader, writer, host=host, port=port, timeout=timeout)
    try:
        await client.greeting()
        if tls_mode == "starttls":
            await client.starttls(context, host)
        elif not client.capabilities:
            await client.capability()
    except BaseException:
        client.close()
        raise
    return client
