"""Raw RFC 5322 bytes to structured fields: the pure part of the parse step.

Nothing here touches the database or blob storage: :func:`message_bytes_parse` takes bytes
and returns a :class:`ParsedMessage`, or raises :class:`Unparseable` with a reason for
what truly cannot be read as a message (the service quarantines it). Python's ``email``
package splits the MIME tree (RFC 2045-2049, RFC 2231 parameters); the text of headers
(RFC 2047 encoded words, undeclared 8-bit bytes) is decoded in :mod:`mailboxes.headers`.
The body is chosen the way ``email.message.EmailMessage.get_body()`` chooses it; what it
lets through unharmed (charset chaos, broken boundaries) we keep, with its defects recorded.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import hashlib
import mimetypes
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mailparser.dates import parse_mail_date

from mailboxes import codes as codes_module
from mailboxes import replies
from mailboxes import sanitize as html_module
from mailboxes.headers import address_list, charset_decode, filename_sanitize, header_text

# Limits that keep one hostile message from costing a worker more than it should.
MAX_HEADERS_KEPT = 10_000
MAX_HEADER_VALUE = 8_000
MAX_TEXT = 2_000_000  # characters of plain text kept in the row
MAX_HTML = 2_000_000
MAX_NESTING = 200  # MIME depth; Python's parser recurses per level
_HEADER_LINE = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")  # RFC 5322 section 2.2 field-name ":"
# A boundary parameter being declared, or a line that starts with "--" (a delimiter candidate).
_BOUNDARY_OR_DELIMITER = re.compile(
    rb'boundary\s*=\s*(?:"(?P<quoted>[^"\r\n]{1,200})"|(?P<token>[^\s;"]{1,200}))|^--(?P<line>[^\r\n]*)',
    re.IGNORECASE | re.MULTILINE,
)
# Depth never exceeds the number of boundaries declared: counting them (one pass in C) spares
# the exact walk for every message that declares no more than MAX_NESTING.
_BOUNDARY_DECLARATION = re.compile(rb"boundary\s*=", re.IGNORECASE)
Message = email.message.Message


class Unparseable(Exception):
    """The bytes are not a message we can read; ``str()`` is the quarantine reason."""


@dataclass
class ParsedAttachment:
    filename: str
    content_type: str
    content: bytes
    content_id: str
    is_inline: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass
class ParsedMessage:
    subject: str = ""
    from_name: str = ""
    from_address: str = ""
    sender: str = ""
    to: list[dict[str, str]] = field(default_factory=list)
    cc: list[dict[str, str]] = field(default_factory=list)
    reply_to: list[dict[str, str]] = field(default_factory=list)
    date: datetime | None = None
    message_id: str = ""
    in_reply_to: str = ""
    references: list[str] = field(default_factory=list)
    headers: list[list[str]] = field(default_factory=list)
    text: str = ""
    html: str = ""  # sanitized
    stripped_text: str = ""
    codes: list[str] = field(default_factory=list)
    links: list[dict[str, str]] = field(default_factory=list)
    authentication_results: str = ""
    received_spf: str = ""
    x_tags: list[str] = field(default_factory=list)
    attachments: list[ParsedAttachment] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)


def _clean(value: Any, limit: int = MAX_HEADER_VALUE) -> str:
    """A value as a str PostgreSQL accepts: no NUL, no lone surrogates, bounded."""
    text = str(value) if value is not None else ""
    text = text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return text[:limit]


def _one_line(value: Any, limit: int = MAX_HEADER_VALUE) -> str:
    """A decoded header value on one line (what is left of folding whitespace collapsed)."""
    return _clean(re.sub(r"\s*[\r\n]+\s*", " ", header_text(value)), limit)


def _iso_2022(text: str) -> str:
    """7-bit ISO-2022 text sent without a charset (RFC 1468): decode its escapes."""
    if "\x1b$" not in text and "\x1b(" not in text:
        return text
    try:
        return text.encode("ascii").decode("iso-2022-jp-ext")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _addresses(raw_value: str | None) -> list[dict[str, str]]:
    result = []
    for name, address in address_list(raw_value or ""):
        address = _clean(address, 320).strip()
        if address or name:
            result.append({"name": _clean(name, 320).strip(), "address": address.lower()})
    return result


def _message_ids(value: str) -> list[str]:
    """Message identifiers in a References/In-Reply-To field (RFC 5322 section 3.6.4)."""
    return [_clean(found, 998) for found in re.findall(r"<[^<>\s]+>", value or "")][:100]


def _nesting_depth(raw: bytes) -> int:
    """How deep multiparts nest (RFC 2046 section 5.1.1), measured without parsing.

    Every declared boundary opens a level; a delimiter line ``--b`` closes the levels opened
    inside ``b`` and ``--b--`` closes ``b`` itself. So a thousand sibling parts, each with a
    boundary of its own, are two levels deep, not a thousand.
    """
    open_boundaries: list[bytes] = []
    deepest = 0
    for match in _BOUNDARY_OR_DELIMITER.finditer(raw):
        line = match.group("line")
        if line is None:
            boundary = match.group("quoted") or match.group("token") or b""
            if boundary and boundary not in open_boundaries:
                open_boundaries.append(boundary)
                deepest = max(deepest, len(open_boundaries))
            continue
        line = line.rstrip(b" \t")
        closing = line.endswith(b"--") and line[:-2] in open_boundaries
        name = line[:-2] if closing else line
        if name in open_boundaries:
            del open_boundaries[open_boundaries.index(name) + (0 if closing else 1) :]
    return deepest


def _looks_like_a_message(raw: bytes) -> bool:
    """Whether the bytes begin with at least one header field (RFC 5322 section 2.1)."""
    first = raw.lstrip(b"\r\n")[:2000].split(b"\n", 1)[0]
    return bool(_HEADER_LINE.match(first)) or first.startswith(b"From ")


def _header_index(message: Message) -> dict[str, list[str]]:
    """Raw values by lower-cased field name, in order (8-bit bytes still surrogate-escaped)."""
    index: dict[str, list[str]] = {}
    for name, value in message.raw_items():
        index.setdefault(str(name).lower(), []).append(str(value))
    return index


def _tags(value: str) -> list[str]:
    return [tag for tag in re.split(r"[,;\s]+", value.lower()) if tag][:20]


def _content_type(part: Message) -> str:
    """``part.get_content_type()``, worked out once a part: the walks ask for it a dozen times,
    and each time the library scans the part's header fields again."""
    known = part.__dict__.get("_content_type_known")
    if known is None:
        known = part.__dict__["_content_type_known"] = part.get_content_type()
    return known


def _is_attachment(part: Message) -> bool:
    """RFC 2183: what ``Content-Disposition: attachment`` marks is a file, never the body."""
    try:
        return part.get_content_disposition() == "attachment"
    except Exception:  # a disposition header too broken to read says nothing
        return False


def _filename(part: Message) -> str:
    """The part's file name: RFC 2231 parameters, then RFC 2047 words and 8-bit bytes decoded."""
    try:
        name = part.get_filename() or ""
    except Exception:  # RFC 2231 continuations mangled beyond what the library reads
        name = ""
    return header_text(name).strip() if name else ""


def _body_candidates(part: Message, subtype: str) -> Iterator[Message]:
    """Text parts of ``subtype`` that make up the body, first as ``EmailMessage.get_body()`` picks.

    The same walk as ``get_body``: attachments and ``message/*`` parts are never entered; a
    ``multipart/related`` contributes only its root (RFC 2387 section 3.2, the ``start``
    parameter or the first part); a ``multipart/alternative`` (RFC 2046 section 5.1.4) only
    the first of its parts that has such a text in it. Other multiparts (mixed, signed,
    report) contribute every such part, as clients split one body around inline images.
    """
    if _is_attachment(part):
        return
    maintype, _, own_subtype = _content_type(part).partition("/")
    if maintype == "text":
        if own_subtype == subtype:
            yield part
        return
    if maintype != "multipart" or not part.is_multipart():
        return
    children = [child for child in part.get_payload() if isinstance(child, Message)]
    if own_subtype == "related":
        start = str(part.get_param("start") or "").strip()
        root = next((child for child in children if start and str(child.get("content-id", "")) == start), None)
        if root is None and children:
            root = children[0]
        if root is not None:
            yield from _body_candidates(root, subtype)
        return
    if own_subtype == "alternative":
        for child in children:
            found = list(_body_candidates(child, subtype))
            if found:
                yield from found
                return
        return
    for child in children:
        yield from _body_candidates(child, subtype)


def _body_parts(message: Message, subtype: str) -> list[Message]:
    """The body's ``text/<subtype>`` parts: ``get_body``'s pick, then unnamed inline siblings."""
    candidates = list(_body_candidates(message, subtype))
    return candidates[:1] + [part for part in candidates[1:] if not _filename(part)]


def _leaves(part: Message) -> Iterator[Message]:
    """Every part that is not a container, in order; a ``message/rfc822`` is one leaf."""
    if _content_type(part).startswith("multipart/") and part.is_multipart():
        for child in part.get_payload():
            if isinstance(child, Message):
                yield from _leaves(child)
    else:
        yield part


def _part_bytes(part: Message) -> bytes:
    """A leaf's content with its transfer encoding undone (RFC 2045 section 6)."""
    if part.is_multipart():  # message/rfc822: the embedded message as bytes
        try:
            return b"".join(child.as_bytes() for child in part.get_payload() if isinstance(child, Message))
        except Exception:
            return str(part.get_payload()).encode("utf-8", "surrogateescape")
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        payload = None
    if isinstance(payload, bytes):
        return payload
    return str(part.get_payload() or "").encode("ascii", "surrogateescape")


def _part_text(part: Message) -> str:
    """A text part as ``str``: its declared charset, or UTF-8 / Windows-1252 when it has none."""
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    text = charset_decode(_part_bytes(part), charset)
    return _iso_2022(text) if not charset or charset in {"us-ascii", "ascii"} else text


def _default_filename(part: Message, position: int) -> str:
    if _content_type(part) == "message/rfc822":
        return "message.eml"
    extension = mimetypes.guess_extension(_content_type(part), strict=False) or ""
    return f"part-{position}{extension}"


def _content_id(part: Message) -> str:
    return _clean(header_text(part.get("content-id") or ""), 255).strip().strip("<>").strip()


def _attachments(message: Message, body: set[int]) -> tuple[list[ParsedAttachment], list[Message]]:
    """The parts that are files; and the text parts that are files only by their disposition."""
    attachments: list[ParsedAttachment] = []
    text_files: list[Message] = []
    for position, part in enumerate(_leaves(message), start=1):
        if id(part) in body or _content_type(part).startswith("multipart/"):
            continue  # a body part, or a multipart whose boundary never came (read as text below)
        filename = _filename(part)
        attached = _is_attachment(part)
        content_id = _content_id(part)
        if _content_type(part) in {"text/plain", "text/html"} and not (filename or attached or content_id):
            continue  # an alternative rendering of the body that lost to the one chosen
        if _content_type(part) == "text/plain":
            text_files.append(part)
        attachments.append(
            ParsedAttachment(
                filename=filename_sanitize(filename or content_id) or _default_filename(part, position),
                content_type=_clean(_content_type(part), 255).lower(),
                content=_part_bytes(part),
                content_id=content_id,
                is_inline=bool(content_id) and not attached,
            )
        )
    return attachments, text_files


def _defects(message: Message) -> list[str]:
    names = {type(defect).__name__ for part in message.walk() for defect in getattr(part, "defects", [])}
    return sorted(_clean(name, 100) for name in names)[:50]


def _declares_many_boundaries(raw: bytes) -> bool:
    """Whether more than MAX_NESTING boundaries are declared. Each declaration holds an "=" and
    the word "boundary", so counting those first (a pass in C each, a few microseconds) spares
    the case-insensitive regex, which cost a third of a millisecond per 10 KiB, for nearly all mail."""
    return (
        raw.count(b"=") > MAX_NESTING
        and raw.lower().count(b"boundary") > MAX_NESTING
        and len(_BOUNDARY_DECLARATION.findall(raw)) > MAX_NESTING
    )


def _message_from_bytes(raw: bytes) -> Message:
    if _declares_many_boundaries(raw) and _nesting_depth(raw) > MAX_NESTING:
        raise Unparseable(f"MIME nesting deeper than {MAX_NESTING} levels")
    try:
        # compat32: the tolerant parser that never raises on a header; the text is decoded by us.
        return email.message_from_bytes(raw, policy=email.policy.compat32)
    except RecursionError:
        raise Unparseable("MIME structure too deep to walk") from None
    except Exception as exc:  # the parser is lenient; anything it still refuses is permanent
        raise Unparseable(f"MIME parser failed: {type(exc).__name__}: {_clean(exc, 300)}") from None


def _date(value: str) -> datetime | None:
    try:
        date = parse_mail_date(header_text(value)).value if value else None
    except Exception:
        return None
    return date if isinstance(date, datetime) and date.tzinfo is not None and 1900 < date.year < 3000 else None


def _bodies(message: Message, parsed: ParsedMessage) -> str:
    """Fill text, html and attachments; returns the sanitized HTML (for links)."""
    plain_parts, html_parts = _body_parts(message, "plain"), _body_parts(message, "html")
    parsed.text = _clean("\n\n".join(_part_text(part) for part in plain_parts), MAX_TEXT)
    raw_html = _clean("\n".join(_part_text(part) for part in html_parts), MAX_HTML)
    parsed.attachments, text_files = _attachments(message, {id(part) for part in (*plain_parts, *html_parts)})
    if raw_html:
        parsed.html = html_module.html_sanitize(raw_html)
        if not parsed.text:  # from the sanitized markup: bounded, well-formed, no scripts or styles
            parsed.text = html_module.html_to_text(parsed.html)[:MAX_TEXT]
    if not parsed.text and not raw_html:
        # No body at all: a multipart whose boundary never matched is its own text (what a
        # mail client shows), else the first text file stands in, and stays a file too.
        unparsed = [part for part in _leaves(message) if _content_type(part).startswith("multipart/")]
        fallback = unparsed[:1] or text_files[:1]
        if fallback:
            parsed.text = _clean(_part_text(fallback[0]), MAX_TEXT)
    return parsed.html


def _header_fields(message: Message, parsed: ParsedMessage) -> None:
    """Fill the fields read from the top-level header section (RFC 5322 section 3.6)."""
    index = _header_index(message)

    def first(name: str) -> str:
        return (index.get(name) or [""])[0]

    def every(name: str) -> list[str]:
        return [_one_line(value) for value in index.get(name, [])]

    parsed.headers = [[_clean(name, 200), _one_line(value)] for name, value in message.raw_items()][:MAX_HEADERS_KEPT]
    parsed.subject = _one_line(first("subject"), 998)
    senders = _addresses(first("from"))
    if senders:
        parsed.from_name, parsed.from_address = senders[0]["name"], senders[0]["address"]
    parsed.sender = _one_line(first("sender"), 320)
    parsed.to = _addresses(", ".join(index.get("to", [])))[:500]
    parsed.cc = _addresses(", ".join(index.get("cc", [])))[:500]
    parsed.reply_to = _addresses(first("reply-to"))[:50]
    parsed.date = _date(first("date"))
    parsed.message_id = (_message_ids(_one_line(first("message-id"))) or [""])[0]
    parsed.in_reply_to = (_message_ids(_one_line(first("in-reply-to"))) or [""])[0]
    parsed.references = _message_ids(" ".join(every("references")))
    parsed.authentication_results = "\n".join(every("authentication-results"))[:MAX_HEADER_VALUE]
    parsed.received_spf = "\n".join(every("received-spf"))[:MAX_HEADER_VALUE]
    parsed.x_tags = _tags(" ".join(every("x-tags")))


def message_bytes_parse(raw: bytes) -> ParsedMessage:
    """Parse one raw message; raise :class:`Unparseable` when it is not a message at all."""
    if not raw.strip():
        raise Unparseable("empty message")
    if not _looks_like_a_message(raw):
        raise Unparseable("no header section (RFC 5322 section 2.1): the bytes do not start with a header field")
    limit = sys.getrecursionlimit()
    parsed = ParsedMessage()
    try:
        sys.setrecursionlimit(max(limit, 4 * MAX_NESTING + 1000))
        message = _message_from_bytes(raw)
        html = _bodies(message, parsed)
        parsed.defects = _defects(message)
        _header_fields(message, parsed)
    except RecursionError:
        raise Unparseable("MIME structure too deep to walk") from None
    except Unparseable:
        raise
    except Exception as exc:  # bytes the library cannot walk: a permanent condition, quarantined
        raise Unparseable(f"MIME parser failed: {type(exc).__name__}: {_clean(exc, 300)}") from None
    finally:
        sys.setrecursionlimit(limit)
    parsed.stripped_text = replies.reply_strip(parsed.text)
    parsed.codes = codes_module.codes_extract(parsed.subject, parsed.text)
    parsed.links = codes_module.links_extract(parsed.text, html)
    return parsed


def message_subject_normalize(subject: str) -> str:
    """The subject without reply/forward prefixes, case-folded: the fallback thread key."""
    return replies.subject_normalize(subject)
