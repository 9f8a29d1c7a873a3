"""Raw RFC 5322 bytes to structured fields: the pure part of the parse step.

Nothing here touches the database or blob storage: :func:`message_bytes_parse` takes bytes
and returns a :class:`ParsedMessage`, or raises :class:`Unparseable` with a reason for
what truly cannot be read as a message (the service quarantines it). mail-parser does the
MIME walk (RFC 2045-2049), RFC 2047 encoded words and RFC 2231 parameters; what it lets
through unharmed (charset chaos, broken boundaries) we keep, with its defects recorded.
"""

from __future__ import annotations

import base64
import email
import email.header
import email.policy
import hashlib
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import mailparser

from mailboxes import codes as codes_module
from mailboxes import replies
from mailboxes import sanitize as html_module

# Limits that keep one hostile message from costing a worker more than it should.
MAX_HEADERS_KEPT = 10_000
MAX_HEADER_VALUE = 8_000
MAX_TEXT = 2_000_000  # characters of plain text kept in the row
MAX_HTML = 2_000_000
MAX_NESTING = 200  # MIME depth; Python's parser recurses per level
_HEADER_LINE = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")  # RFC 5322 section 2.2 field-name ":"


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
    """A header value as a str PostgreSQL accepts: no NUL, no lone surrogates, bounded."""
    text = str(value) if value is not None else ""
    text = text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return text[:limit]


def _iso_2022(text: str) -> str:
    """mail-parser leaves 7-bit ISO-2022 bodies (RFC 1468) undecoded: decode their escapes."""
    if "\x1b$" not in text and "\x1b(" not in text:
        return text
    try:
        return text.encode("ascii").decode("iso-2022-jp-ext")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _decode_header(value: Any) -> str:
    """Decode RFC 2047 encoded words, whatever charset they claim (unknown ones replaced)."""
    if isinstance(value, email.header.Header):
        value = str(value)
    raw = str(value)
    try:
        parts = email.header.decode_header(raw)
    except Exception:
        return _clean(raw)
    out = []
    for chunk, charset in parts:
        if isinstance(chunk, bytes):
            try:
                out.append(chunk.decode(charset or "ascii", "replace"))
            except LookupError:
                out.append(chunk.decode("utf-8", "replace"))
        else:
            out.append(chunk)
    return _clean(re.sub(r"\s*\r?\n\s*", " ", "".join(out)))


def _addresses(pairs: Any) -> list[dict[str, str]]:
    result = []
    for pair in pairs or []:
        try:
            name, address = pair
        except (TypeError, ValueError):
            continue
        address = _clean(address, 320).strip()
        if address or name:
            result.append({"name": _clean(name, 320).strip(), "address": address.lower()})
    return result


def _message_ids(value: str) -> list[str]:
    """Message identifiers in a References/In-Reply-To field (RFC 5322 section 3.6.4)."""
    return [_clean(found, 998) for found in re.findall(r"<[^<>\s]+>", value or "")][:100]


def _nesting_depth(raw: bytes) -> int:
    """An upper bound of MIME nesting: the number of distinct multipart boundaries declared."""
    return len(set(re.findall(rb'boundary="?([^";\r\n]+)', raw, flags=re.IGNORECASE)))


def _looks_like_a_message(raw: bytes) -> bool:
    """Whether the bytes begin with at least one header field (RFC 5322 section 2.1)."""
    first = raw.lstrip(b"\r\n")[:2000].split(b"\n", 1)[0]
    return bool(_HEADER_LINE.match(first)) or first.startswith(b"From ")


def _headers(raw: bytes) -> list[list[str]]:
    header_part = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]
    parsed = email.message_from_bytes(header_part + b"\r\n\r\n", policy=email.policy.compat32)
    return [[_clean(name, 200), _decode_header(value)] for name, value in parsed.items()[:MAX_HEADERS_KEPT]]


def _first(headers: list[list[str]], name: str) -> str:
    lowered = name.lower()
    for header_name, value in headers:
        if header_name.lower() == lowered:
            return value
    return ""


def _all(headers: list[list[str]], name: str) -> list[str]:
    lowered = name.lower()
    return [value for header_name, value in headers if header_name.lower() == lowered]


def _attachment_bytes(entry: dict[str, Any]) -> bytes:
    payload = entry.get("payload") or ""
    if entry.get("binary"):
        try:
            return base64.b64decode(payload)
        except (ValueError, TypeError):
            return str(payload).encode("utf-8", "replace")
    if isinstance(payload, bytes):
        return payload
    return str(payload).encode(entry.get("charset") or "utf-8", "replace")


def _content_id(value: Any) -> str:
    return _clean(value or "", 255).strip().strip("<>").strip()


def _tags(value: str) -> list[str]:
    return [tag for tag in re.split(r"[,;\s]+", value.lower()) if tag][:20]


def message_bytes_parse(raw: bytes) -> ParsedMessage:
    """Parse one raw message; raise :class:`Unparseable` when it is not a message at all."""
    if not raw.strip():
        raise Unparseable("empty message")
    if not _looks_like_a_message(raw):
        raise Unparseable("no header section (RFC 5322 section 2.1): the bytes do not start with a header field")
    if _nesting_depth(raw) > MAX_NESTING:
        raise Unparseable(f"MIME nesting deeper than {MAX_NESTING} levels")
    limit = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(max(limit, 4 * MAX_NESTING + 1000))
        mail = mailparser.parse_from_bytes(raw)
        headers = _headers(raw)
    except RecursionError:
        raise Unparseable("MIME structure too deep to walk") from None
    except Exception as exc:  # mail-parser wraps many library errors; all are permanent here
        raise Unparseable(f"mail-parser failed: {type(exc).__name__}: {_clean(exc, 300)}") from None
    finally:
        sys.setrecursionlimit(limit)

    parsed = ParsedMessage(headers=headers)
    parsed.subject = _decode_header(_first(headers, "Subject"))[:998]
    senders = _addresses(mail.from_)
    if senders:
        parsed.from_name, parsed.from_address = senders[0]["name"], senders[0]["address"]
    parsed.sender = _decode_header(_first(headers, "Sender"))[:320]
    parsed.to = _addresses(mail.to)[:500]
    parsed.cc = _addresses(getattr(mail, "cc", []))[:500]
    parsed.reply_to = _addresses(getattr(mail, "reply_to", []))[:50]
    date = mail.date
    parsed.date = date if isinstance(date, datetime) and date.tzinfo is not None and 1900 < date.year < 3000 else None
    parsed.message_id = (_message_ids(_first(headers, "Message-ID")) or [""])[0]
    parsed.in_reply_to = (_message_ids(_first(headers, "In-Reply-To")) or [""])[0]
    parsed.references = _message_ids(" ".join(_all(headers, "References")))
    parsed.authentication_results = "\n".join(_all(headers, "Authentication-Results"))[:MAX_HEADER_VALUE]
    parsed.received_spf = "\n".join(_all(headers, "Received-SPF"))[:MAX_HEADER_VALUE]
    parsed.x_tags = _tags(" ".join(_all(headers, "X-Tags")))

    parsed.text = _clean(_iso_2022("\n\n".join(mail.text_plain)), MAX_TEXT)
    raw_html = _clean(_iso_2022("\n".join(mail.text_html)), MAX_HTML)
    if raw_html:
        parsed.html = html_module.html_sanitize(raw_html)
        if not parsed.text:
            parsed.text = html_module.html_to_text(raw_html)[:MAX_TEXT]
    for position, entry in enumerate(mail.attachments):
        disposition = str(entry.get("content-disposition") or "").lower()
        content_id = _content_id(entry.get("content-id"))
        parsed.attachments.append(
            ParsedAttachment(
                filename=_clean(entry.get("filename") or f"part-{position + 1}", 255),
                content_type=_clean(entry.get("mail_content_type") or "application/octet-stream", 255).lower(),
                content=_attachment_bytes(entry),
                content_id=content_id,
                is_inline=bool(content_id) and not disposition.startswith("attachment"),
            )
        )
    parsed.stripped_text = replies.reply_strip(parsed.text)
    parsed.codes = codes_module.codes_extract(parsed.subject, parsed.text)
    parsed.links = codes_module.links_extract(parsed.text, raw_html)
    parsed.defects = sorted({_clean(name, 100) for name in (mail.defects_categories or [])})[:50]
    return parsed


def message_subject_normalize(subject: str) -> str:
    """The subject without reply/forward prefixes, case-folded: the fallback thread key."""
    return replies.subject_normalize(subject)
