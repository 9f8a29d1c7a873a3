"""IMAP4rev1 wire format (RFC 3501 section 9): reading commands, writing strings and lists."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import getaddresses, parsedate_to_datetime

from mailaccess.mime import Entity


class ParseError(ValueError):
    pass


@dataclass(frozen=True)
class Literal:
    """A literal string ``{n}`` as it came in (bytes, possibly 8-bit)."""

    data: bytes


Token = str | Literal | list["Token"]

_ATOM_END = set(b' ()"{')


def tokenize(segments: list[bytes | Literal]) -> list[Token]:
    """Parse a command's arguments (after tag and name) into atoms, strings, literals and lists.

    ``segments`` alternates text and the literals that followed a ``{n}`` at the end of a
    line. An atom holding ``[`` runs to its ``]`` (``BODY[HEADER.FIELDS (A B)]<0.10>``).
    """
    stack: list[list[Token]] = [[]]
    for segment in segments:
        if isinstance(segment, Literal):
            stack[-1].append(segment)
            continue
        data = segment
        index = 0
        while index < len(data):
            char = data[index]
            if char == 0x20:
                index += 1
            elif char == 0x28:  # (
                stack.append([])
                index += 1
            elif char == 0x29:  # )
                if len(stack) == 1:
                    raise ParseError("unbalanced )")
                done = stack.pop()
                stack[-1].append(done)
                index += 1
            elif char == 0x22:  # "
                index += 1
                out = bytearray()
                while True:
                    if index >= len(data):
                        raise ParseError("unterminated string")
                    char = data[index]
                    if char == 0x5C and index + 1 < len(data):
                        out.append(data[index + 1])
                        index += 2
                        continue
                    if char == 0x22:
                        index += 1
                        break
                    out.append(char)
                    index += 1
                stack[-1].append(out.decode("utf-8", "replace"))
            elif char == 0x7B:  # { : the literal marker; its bytes are the next segment
                end = data.find(b"}", index)
                if end < 0 or end != len(data) - 1:
                    raise ParseError("bad literal")
                index = end + 1
            else:
                start = index
                depth = 0
                while index < len(data):
                    char = data[index]
                    if char == 0x5B:
                        depth += 1
                    elif char == 0x5D:
                        depth = max(0, depth - 1)
                    elif depth == 0 and char in _ATOM_END:
                        break
                    index += 1
                stack[-1].append(data[start:index].decode("utf-8", "replace"))
    if len(stack) != 1:
        raise ParseError("unbalanced (")
    return stack[0]


LITERAL_AT_END = re.compile(rb"\{(\d{1,10})(\+?)\}\r?\n?$")


# --- Output -------------------------------------------------------------------------------
def quoted(value: str | bytes | None) -> bytes:
    """A string as IMAP wants it: NIL, a quoted string, or a literal for 8-bit or long text."""
    if value is None:
        return b"NIL"
    data = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    if len(data) > 1000 or any(byte > 0x7E or byte in (0x0A, 0x0D, 0x00) for byte in data):
        return b"{%d}\r\n" % len(data) + data
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def plist(items: list[bytes]) -> bytes:
    return b"(" + b" ".join(items) + b")" if items else b"NIL"


def internal_date(moment: datetime) -> bytes:
    return moment.astimezone(UTC).strftime("%d-%b-%Y %H:%M:%S +0000").encode()


def _header(entity: Entity, name: str) -> str | None:
    value = entity.headers.get(name)
    if value is None:
        return None
    return re.sub(r"\r?\n[ \t]+", " ", str(value)).strip()


def _addresses(entity: Entity, name: str) -> bytes:
    value = _header(entity, name)
    if not value:
        return b"NIL"
    items = []
    for display, address in getaddresses([value]):
        if not address and not display:
            continue
        mailbox, _, host = address.rpartition("@") if "@" in address else (address, "", "")
        items.append(
            b"(" + b" ".join([quoted(display or None), b"NIL", quoted(mailbox or None), quoted(host or None)]) + b")"
        )
    return plist(items)


def envelope(entity: Entity) -> bytes:
    """ENVELOPE (RFC 3501 section 7.4.2): header values as they are (encoded words kept)."""
    sender = "sender" if entity.headers.get("sender") else "from"
    reply_to = "reply-to" if entity.headers.get("reply-to") else "from"
    return plist(
        [
            quoted(_header(entity, "date")),
            quoted(_header(entity, "subject")),
            _addresses(entity, "from"),
            _addresses(entity, sender),
            _addresses(entity, reply_to),
            _addresses(entity, "to"),
            _addresses(entity, "cc"),
            _addresses(entity, "bcc"),
            quoted(_header(entity, "in-reply-to")),
            quoted(_header(entity, "message-id")),
        ]
    )


def _raw_params(entity: Entity, header: str) -> list[tuple[str, str]]:
    """The parameters as written: RFC 2231 ``name*`` values are passed on undecoded, as
    Dovecot does (the client decodes them)."""
    value = _header(entity, header)
    if not value:
        return []
    found = []
    for piece in _split_params(value)[1:]:
        name, equals, raw = piece.partition("=")
        if not equals:
            continue
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        found.append((name.strip(), raw))
    return _continuations_joined(found)


def _continuations_joined(params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """RFC 2231 section 3: ``name*0*``, ``name*1*``... become one ``name*`` (still encoded)."""
    joined: list[tuple[str, str]] = []
    pieces: dict[str, list[tuple[int, str, bool]]] = {}
    for name, value in params:
        match = re.fullmatch(r"(.+?)\*(\d+)(\*?)", name)
        if not match:
            joined.append((name, value))
            continue
        base = match.group(1)
        if base not in pieces:
            pieces[base] = []
            joined.append((base, ""))
        pieces[base].append((int(match.group(2)), value, bool(match.group(3))))
    result = []
    for name, value in joined:
        if name in pieces and value == "":
            ordered = sorted(pieces[name])
            extended = any(flag for _n, _v, flag in ordered)
            result.append((name + ("*" if extended else ""), "".join(v for _n, v, _f in ordered)))
        else:
            result.append((name, value))
    return result


def _split_params(value: str) -> list[str]:
    pieces, current, in_quotes, escaped = [], [], False, False
    for char in value:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\" and in_quotes:
            current.append(char)
            escaped = True
        elif char == '"':
            current.append(char)
            in_quotes = not in_quotes
        elif char == ";" and not in_quotes:
            pieces.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    pieces.append("".join(current).strip())
    return [piece for piece in pieces if piece] if pieces else []


def _params(entity: Entity, header: str, *, default_charset: bool = False) -> bytes:
    items: list[bytes] = []
    params = _raw_params(entity, header)
    for name, value in params:
        items += [quoted(name.upper()), quoted(value)]
    if default_charset and not any(name.lower() == "charset" for name, _value in params):
        items += [b'"CHARSET"', b'"us-ascii"']
    return plist(items)


def _disposition(entity: Entity) -> bytes:
    value = entity.headers.get("content-disposition")
    if not value:
        return b"NIL"
    kind = str(value).split(";", 1)[0].strip()
    return b"(" + quoted(kind.upper()) + b" " + _params(entity, "content-disposition") + b")"


def bodystructure(entity: Entity, *, extended: bool = True) -> bytes:
    """BODYSTRUCTURE (``extended``) or BODY (RFC 3501 section 7.4.2), nested multipart included."""
    if entity.is_multipart and entity.children:
        out = b"(" + b"".join(bodystructure(child, extended=extended) for child in entity.children)
        out += b" " + quoted(entity.content_type.split("/", 1)[1].upper())
        if extended:
            out += b" " + _params(entity, "content-type") + b" " + _disposition(entity) + b" NIL NIL"
        return out + b")"
    maintype, _, subtype = entity.content_type.partition("/")
    if entity.is_multipart:  # no parts: describe it as plain text, as Dovecot does
        maintype, subtype = "text", "plain"
    params = _params(entity, "content-type", default_charset=maintype == "text")
    encoding = (_header(entity, "content-transfer-encoding") or "7BIT").upper()
    fields = [
        quoted(maintype.upper()),
        quoted(subtype.upper()),
        params,
        quoted(_header(entity, "content-id")),
        quoted(_header(entity, "content-description")),
        quoted(encoding),
        b"%d" % (entity.end - entity.body_start),
    ]
    if entity.is_rfc822 and entity.message is not None:
        fields += [envelope(entity.message), bodystructure(entity.message, extended=extended), b"%d" % entity.lines]
    elif maintype == "text":
        fields.append(b"%d" % entity.lines)
    if extended:
        fields += [quoted(_header(entity, "content-md5")), _disposition(entity), b"NIL", b"NIL"]
    return b"(" + b" ".join(fields) + b")"


# --- Sequence sets ------------------------------------------------------------------------
def sequence_set(text: str, highest: int) -> list[tuple[int, int]]:
    """``1:3,7,9:*`` as inclusive ranges; ``*`` is ``highest`` (RFC 3501 section 9, seq-set)."""
    ranges = []
    for piece in text.split(","):
        if not piece:
            raise ParseError("empty sequence")
        first, _, last = piece.partition(":")
        start = highest if first == "*" else _number(first)
        end = start if not last else (highest if last == "*" else _number(last))
        if start > end:
            start, end = end, start
        ranges.append((start, end))
    return ranges


def _number(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise ParseError(f"bad number {text}")
    return int(text)


def in_ranges(value: int, ranges: list[tuple[int, int]]) -> bool:
    return any(start <= value <= end for start, end in ranges)


def parse_date(text: str) -> datetime:
    """A SEARCH date (``1-Feb-1994``), as midnight UTC."""
    return datetime.strptime(text, "%d-%b-%Y").replace(tzinfo=UTC)


def header_date(value: str | None) -> datetime | None:
    try:
        return parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError):
        return None
