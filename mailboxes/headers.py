"""Header field text as people wrote it: RFC 2047 encoded words and undeclared 8-bit bytes.

The parser reads header bytes as ASCII with surrogate escapes, so a header that carries raw
8-bit bytes (RFC 6532 allows UTF-8; older mailers send Latin-1 or Windows-1252 without a
word about it) arrives here as a ``str`` with lone surrogates. :func:`header_text` turns
such a value back into bytes and decodes them as UTF-8 when they are valid UTF-8, else as
Windows-1252 (a superset of Latin-1 for every printable character, and what browsers do
for undeclared 8-bit text): never a surrogate, never U+FFFD for valid UTF-8.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.utils
import re

# RFC 2047 section 2: =?charset?encoding?encoded-text?= (charset may carry an RFC 2231 *language).
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"[ \t\r\n]*")
_FOLD = re.compile(r"\r?\n(?=[ \t])")  # RFC 5322 section 2.2.3: unfolding removes the CRLF only
_QP_HEX = re.compile(rb"=([0-9A-Fa-f]{2})")


def bytes_text(data: bytes) -> str:
    """Bytes of unknown charset: UTF-8 when valid, else Windows-1252 (bytes it lacks as Latin-1)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8D, 0x8F, 0x90, 0x9D are unassigned in cp1252
        return "".join(data[i : i + 1].decode("cp1252", "ignore") or chr(data[i]) for i in range(len(data)))


def charset_decode(data: bytes, charset: str | None) -> str:
    """Bytes in a declared charset; an unknown or wrong declaration falls back to :func:`bytes_text`."""
    name = (charset or "").strip().strip('"').split("*", 1)[0].lower()
    if name in {"", "us-ascii", "ascii", "unknown-8bit", "x-unknown", "8bit", "default"}:
        return bytes_text(data)
    if name in {"iso-8859-1", "latin-1", "latin1", "iso_8859-1"}:
        name = "cp1252"  # what every browser does: Windows-1252 is what these mailers really mean
    try:
        if not getattr(codecs.lookup(name), "_is_text_encoding", True):  # rot13, base64, zlib
            return bytes_text(data)
    except (LookupError, ValueError):  # unknown, or not even a name (an embedded NUL)
        return bytes_text(data)
    try:
        return data.decode(name)
    except UnicodeError:
        if name in {"utf-8", "utf8"}:
            return bytes_text(data)
    except Exception:  # a codec that fails in its own way (idna, punycode) reads nothing
        return bytes_text(data)
    try:
        return data.decode(name, "replace")
    except Exception:
        return bytes_text(data)


def _undeclared(value: str) -> str:
    """A parsed header string with surrogate-escaped 8-bit bytes decoded (see the module docstring)."""
    if value.isascii():
        return value
    try:
        data = value.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return bytes_text(data)


def _word_bytes(encoding: str, text: str) -> bytes:
    if encoding in "Bb":
        compact = re.sub(r"[^A-Za-z0-9+/]", "", text)
        try:
            return base64.b64decode(compact + "=" * (-len(compact) % 4))
        except (binascii.Error, ValueError):
            return text.encode("ascii", "replace")
    # RFC 2047 section 4.2: "_" is a space, "=XX" a byte.
    raw = text.replace("_", " ").encode("ascii", "replace")
    return _QP_HEX.sub(lambda match: bytes([int(match.group(1), 16)]), raw)


def encoded_words_decode(value: str) -> str:
    """Decode RFC 2047 encoded words; adjacent words in one charset are joined before decoding.

    Whitespace between two encoded words is not part of the text (RFC 2047 section 6.2);
    joining the bytes first keeps a multi-byte character split across two words intact.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pending: list[bytes] = []
    pending_charset = ""
    position = 0

    def flush() -> None:
        if pending:
            out.append(charset_decode(b"".join(pending), pending_charset))
            pending.clear()

    for match in _ENCODED_WORD.finditer(value):
        between = value[position : match.start()]
        charset = match.group(1).split("*", 1)[0].lower()
        if between and not (pending and _BETWEEN_WORDS.fullmatch(between)):
            flush()
            out.append(between)
        elif pending and charset != pending_charset:
            flush()
        pending_charset = charset
        pending.append(_word_bytes(match.group(2), match.group(3)))
        position = match.end()
    flush()
    out.append(value[position:])
    return "".join(out)


def header_text(value: object) -> str:
    """The text of one raw header value: unfolded, 8-bit decoded, encoded words decoded."""
    text = _FOLD.sub("", str(value) if value is not None else "")
    return encoded_words_decode(_undeclared(text))


def address_list(value: object) -> list[tuple[str, str]]:
    """(display name, address) pairs of an address field (RFC 5322 section 3.4), names decoded.

    The list is split before encoded words are decoded, so a name like
    ``=?utf-8?q?Doe=2C_John?=`` stays one name (RFC 2047 section 5 (3)).
    """
    text = _undeclared(_FOLD.sub("", str(value) if value is not None else ""))
    pairs = []
    for name, address in email.utils.getaddresses([text]):
        pairs.append((" ".join(encoded_words_decode(name).split()), address.strip()))
    return pairs


# C0 and C1 controls and DEL (a CR or LF would split a Content-Disposition header), plus the
# bidirectional overrides that make "invoice\u202efdp.exe" read as "invoiceexe.pdf".
_FILENAME_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
MAX_FILENAME = 255


def filename_sanitize(name: str) -> str:
    """A file name safe to store and to send in Content-Disposition (RFC 6266 section 4.3).

    Control characters are removed, path separators become ``_`` (a name is never a path,
    RFC 2183 section 2.3), surrounding spaces and dots go; everything else, Unicode
    included, is kept. May return ``""``: the caller picks a default.
    """
    cleaned = _FILENAME_UNSAFE.sub("", name.encode("utf-8", "replace").decode("utf-8"))
    cleaned = re.sub(r"[/\\]", "_", cleaned)
    cleaned = " ".join(cleaned.split()).strip(" .")
    return cleaned[:MAX_FILENAME]
