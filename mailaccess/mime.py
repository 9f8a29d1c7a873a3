"""The MIME structure of a raw message as byte offsets, for IMAP FETCH (RFC 3501 section 6.4.5).

The message is scanned once, line by line, from a seekable file (a spooled copy of the blob:
in memory when small, on disk when large), so a 20 MB message never sits in memory. Each
entity records where its header and body start and end; ``BODY[section]`` and partial fetches
are then ranged reads of that file, and ``BODYSTRUCTURE`` and ``ENVELOPE`` come from the
parsed headers of each entity.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass, field
from email.message import Message as EmailMessage
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import IO

LINE_LIMIT = 64 * 1024  # a longer "line" is read in pieces (it can never be a boundary)
MAX_DEPTH = 40  # nesting refused past this, so a hostile message cannot exhaust the stack


@dataclass
class Entity:
    """One MIME entity: its header block ``[start, body_start)`` and body ``[body_start, end)``."""

    start: int
    body_start: int = 0
    end: int = 0
    lines: int = 0  # lines of the body (body-fld-lines)
    header_lines: int = 0  # lines of the header block, its blank line included
    headers: EmailMessage = field(default_factory=EmailMessage)
    children: list[Entity] = field(default_factory=list)
    message: Entity | None = None  # the encapsulated message of a message/rfc822 entity

    @property
    def maintype(self) -> str:
        return self.content_type.split("/", 1)[0]

    @property
    def content_type(self) -> str:
        value = self.headers.get_content_type() if self.headers.get("content-type") else "text/plain"
        return value.lower()

    @property
    def is_multipart(self) -> bool:
        return self.maintype == "multipart"

    @property
    def is_rfc822(self) -> bool:
        return self.content_type in ("message/rfc822", "message/global")


class _Lines:
    """Lines of a file with their offsets, with one line of push-back."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.offset = 0
        self.pushed: tuple[int, bytes] | None = None

    def next(self) -> tuple[int, bytes] | None:
        if self.pushed is not None:
            pushed, self.pushed = self.pushed, None
            return pushed
        line = self.handle.readline(LINE_LIMIT)
        if not line:
            return None
        offset = self.offset
        self.offset += len(line)
        return offset, line

    def push(self, item: tuple[int, bytes]) -> None:
        self.pushed = item


def _boundary_of(line: bytes, boundaries: list[bytes]) -> tuple[bytes, bool] | None:
    """The boundary this line is a delimiter of, and whether it closes (RFC 2046 section 5.1.1)."""
    if not line.startswith(b"--"):
        return None
    stripped = line.rstrip(b"\r\n").rstrip(b" \t")
    for boundary in reversed(boundaries):
        if stripped == b"--" + boundary:
            return boundary, False
        if stripped == b"--" + boundary + b"--":
            return boundary, True
    return None


def _ending(line: bytes) -> int:
    if line.endswith(b"\r\n"):
        return 2
    return 1 if line.endswith(b"\n") else 0


def _entity(lines: _Lines, start: int, boundaries: list[bytes], depth: int) -> Entity:
    entity = Entity(start=start)
    header = bytearray()
    body_start = start
    while True:
        item = lines.next()
        if item is None:
            body_start = lines.offset
            break
        offset, line = item
        if _boundary_of(line, boundaries):
            lines.push(item)
            body_start = offset
            break
        if line in (b"\r\n", b"\n"):
            entity.header_lines += 1
            body_start = offset + len(line)
            break
        if len(header) < 256 * 1024:
            header += line
        entity.header_lines += 1
        body_start = offset + len(line)
    entity.headers = BytesHeaderParser(policy=compat32).parsebytes(bytes(header))
    entity.body_start = body_start
    boundary = entity.headers.get_param("boundary") if entity.is_multipart else None
    if isinstance(boundary, tuple):  # RFC 2231 encoded
        boundary = email.utils.collapse_rfc2231_value(boundary)
    if entity.is_multipart and boundary and depth < MAX_DEPTH:
        _multipart_body(entity, lines, [*boundaries, str(boundary).encode("latin-1", "replace")], depth)
    elif entity.is_rfc822 and depth < MAX_DEPTH:
        entity.message = _entity(lines, body_start, boundaries, depth + 1)
        entity.end = entity.message.end
        entity.lines = entity.message.header_lines + entity.message.lines
    else:
        _leaf_body(entity, lines, boundaries)
    return entity


def _leaf_body(entity: Entity, lines: _Lines, boundaries: list[bytes]) -> None:
    end, count, previous = entity.body_start, 0, 0
    while True:
        item = lines.next()
        if item is None:
            end = lines.offset
            break
        offset, line = item
        if _boundary_of(line, boundaries):
            lines.push(item)
            end = max(entity.body_start, offset - previous)  # the CRLF before a delimiter is its own
            if previous:
                count -= 1
            break
        count += line.count(b"\n")
        previous = _ending(line)
        end = offset + len(line)
    entity.end = end
    entity.lines = count


def _multipart_body(entity: Entity, lines: _Lines, boundaries: list[bytes], depth: int) -> None:
    own = boundaries[-1]
    closed = False
    count = 0
    previous = 0
    end = entity.body_start
    while True:
        item = lines.next()
        if item is None:
            end = lines.offset
            break
        offset, line = item
        found = _boundary_of(line, boundaries)
        if found is None:
            count += line.count(b"\n")
            previous = _ending(line)
            end = offset + len(line)
            continue
        boundary, closing = found
        if boundary != own or closed:  # an outer delimiter ends this body
            lines.push(item)
            end = max(entity.body_start, offset - previous)
            break
        count += line.count(b"\n")
        end = offset + len(line)
        if closing:
            closed = True  # the epilogue follows, up to an outer delimiter or the end
            previous = 0  # the line break after the close stays in this body, as in Dovecot
            continue
        child = _entity(lines, offset + len(line), boundaries, depth + 1)
        entity.children.append(child)
        count += child.lines + 1
        end = child.end
        previous = 0
    entity.end = end
    entity.lines = count
    if not entity.children:  # no delimiter found: one empty part, as Dovecot shows it
        entity.children.append(Entity(start=end, body_start=end, end=end))


def parse(handle: IO[bytes]) -> Entity:
    """The entity tree of the message in ``handle`` (read from its current start)."""
    handle.seek(0)
    lines = _Lines(handle)
    root = _entity(lines, 0, [], 0)
    # Whatever follows (an unterminated multipart's tail) still belongs to the root's body.
    root.end = max(root.end, lines.offset) if not root.is_multipart else root.end
    return root


# --- Sections (RFC 3501 section 6.4.5, BODY[<section>]) -------------------------------------
class SectionError(ValueError):
    pass


def section_range(root: Entity, section: str) -> tuple[str, Entity, list[bytes] | None, bool]:
    """Resolve ``section`` ("", "HEADER", "1.2", "2.MIME", "3.HEADER.FIELDS (A B)").

    Returns (kind, entity, field names or None, exclude): kind is "all", "header", "text",
    "mime" or "body"; the range is then :func:`section_bounds`.
    """
    spec = section.strip()
    names: list[bytes] | None = None
    exclude = False
    if "(" in spec:
        spec, _, rest = spec.partition("(")
        names = [name.encode().lower() for name in rest.rstrip(")").split()]
        spec = spec.strip()
    parts = spec.split(".") if spec else []
    numbers: list[int] = []
    while parts and parts[0].isdigit():
        number = int(parts.pop(0))
        if number < 1:
            raise SectionError(section)
        numbers.append(number)
    text = ".".join(parts).upper()
    entity = root
    for number in numbers:
        if entity.is_multipart:
            if number > len(entity.children):
                raise SectionError(section)
            entity = entity.children[number - 1]
        elif entity.is_rfc822 and entity.message is not None and entity is not root:
            inner = entity.message
            if inner.is_multipart:
                if number > len(inner.children):
                    raise SectionError(section)
                entity = inner.children[number - 1]
            elif number == 1:
                entity = inner
            else:
                raise SectionError(section)
        elif number != 1:
            raise SectionError(section)
    if not text:
        return ("all" if not numbers else "body"), entity, None, False
    if text == "MIME":
        if not numbers:
            raise SectionError(section)
        return "mime", entity, None, False
    if numbers:  # HEADER and TEXT of a part address its encapsulated message
        if not (entity.is_rfc822 and entity.message is not None):
            raise SectionError(section)
        entity = entity.message
    if text == "HEADER":
        return "header", entity, None, False
    if text == "TEXT":
        return "text", entity, None, False
    if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT") and names is not None:
        exclude = text.endswith(".NOT")
        return "fields", entity, names, exclude
    raise SectionError(section)


def section_bounds(kind: str, entity: Entity, total: int) -> tuple[int, int]:
    if kind == "all":
        return 0, total
    if kind in ("header", "mime", "fields"):
        return entity.start, entity.body_start
    return entity.body_start, entity.end  # text, body


def header_fields(header: bytes, names: list[bytes], exclude: bool) -> bytes:
    """The named fields of a header block (folded lines kept), and the blank line after them."""
    chosen = bytearray()
    keep = False
    for line in header.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t"):
            if keep:
                chosen += line
            continue
        name = line.split(b":", 1)[0].strip().lower()
        keep = (name in names) != exclude
        if keep:
            chosen += line
    return bytes(chosen) + b"\r\n"
