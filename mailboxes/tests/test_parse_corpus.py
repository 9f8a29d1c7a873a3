"""Our parse of a corpus of real-world shaped messages against Python's own ``email`` package.

For every fixture, the subject, the From and To display names and addresses, and the text
body must agree with ``email.message_from_bytes(raw, policy=policy.default)`` (whitespace
normalised; the body is what ``get_body(("plain",))`` picks). Where we deliberately read a
message better than the standard library does, the difference is listed in ``EXCEPTIONS``
with the reason and the value we give instead, so every disagreement is asserted, not skipped.
"""

from __future__ import annotations

import email
from email import policy
from pathlib import Path
from typing import Any

import pytest

from mailboxes.parse import ParsedMessage, message_bytes_parse
from mailboxes.tests.helpers import FIXTURES

QUARANTINED = {"garbage.eml", "deep_nesting.eml", "no_headers_text.eml"}
CORPUS = sorted(
    path for path in [*FIXTURES.glob("*.eml"), *(FIXTURES / "corpus").glob("*.eml")] if path.name not in QUARANTINED
)

_UNDECLARED_8BIT = "policy.default decodes undeclared 8-bit header bytes that are not UTF-8 to U+FFFD or surrogates"
_RAW_UTF8_ADDRESS = "policy.default leaves raw UTF-8 (RFC 6532) in address fields as surrogate escapes"
_TEXT_JOINED = "inline text parts around an inline image are one body; get_body() returns only the first part"
EXCEPTIONS: dict[str, dict[str, tuple[Any, str]]] = {
    "latin1_raw_headers.eml": {
        "subject": ("Re: Café crème à 8€", _UNDECLARED_8BIT),
        "from": ([("René Dupré", "rene@example.fr")], _UNDECLARED_8BIT),
        "to": ([("Françoise", "francoise@example.fr")], _UNDECLARED_8BIT),
    },
    "missing_charset_8bit.eml": {
        "text": (
            "Schöne Grüße, der Bestätigungscode lautet 550193.",
            "no charset and 8-bit UTF-8 bytes: policy.default reads us-ascii and yields U+FFFD",
        ),
    },
    "unknown_charset.eml": {
        "subject": ("Café", "an unknown RFC 2047 charset: policy.default keeps the raw bytes undecoded"),
        "text": (
            "Bytes ÿþý in an unknown charset",
            "an unknown body charset: policy.default raises LookupError; we read it as Windows-1252",
        ),
    },
    "split_body_inline_image.eml": {
        "text": ("Here is the photo: And the rest of the message after it.", _TEXT_JOINED),
    },
    "missing_final_boundary.eml": {
        "text": ("First part. Second part, never closed.", _TEXT_JOINED),
    },
    "malformed_boundary.eml": {
        "text": (
            "--different Content-Type: text/plain The boundary never matches. --different--",
            "the declared boundary never comes: get_body() finds nothing, we show the body as text",
        ),
    },
    "attachment_only_text.eml": {
        "text": (
            "Export code 884213, 42 rows.",
            "no body at all: the only text file stands in for it (and stays an attachment)",
        ),
    },
    "utf8_raw_headers.eml": {
        "from": ([("René Müller", "rene@bäckerei.example")], _RAW_UTF8_ADDRESS),
        "to": ([("Zoë Ångström", "zoe@example.org"), ("Doe, John", "john@example.org")], _RAW_UTF8_ADDRESS),
    },
    "many_shallow_parts.eml": {
        "text": (" ".join(f"Item {i} of the digest" for i in range(220)), _TEXT_JOINED),
    },
}


def _normal(value: str) -> str:
    return " ".join(value.split())


def _python_view(raw: bytes) -> dict[str, Any]:
    message = email.message_from_bytes(raw, policy=policy.default)
    view: dict[str, Any] = {"subject": _normal(str(message["subject"] or ""))}
    for name in ("from", "to"):
        header = message[name]
        addresses = header.addresses if header is not None else ()
        view[name] = [(_normal(a.display_name), a.addr_spec.lower()) for a in addresses]
    try:
        body = message.get_body(("plain",))
        view["text"] = _normal(body.get_content()) if body is not None else None
    except LookupError:
        view["text"] = "<LookupError>"
    return view


def _our_view(parsed: ParsedMessage) -> dict[str, Any]:
    return {
        "subject": _normal(parsed.subject),
        "from": [(_normal(parsed.from_name), parsed.from_address)] if parsed.from_address else [],
        "to": [(_normal(entry["name"]), entry["address"]) for entry in parsed.to],
        "text": _normal(parsed.text),
    }


@pytest.mark.parametrize("path", CORPUS, ids=lambda path: path.name)
def test_it_agrees_with_the_standard_library_on_every_fixture(path: Path) -> None:
    raw = path.read_bytes()
    ours, theirs = _our_view(message_bytes_parse(raw)), _python_view(raw)
    exceptions = EXCEPTIONS.get(path.name, {})
    for field_name in ("subject", "from", "to", "text"):
        if field_name in exceptions:
            expected, reason = exceptions[field_name]
            expected = _normal(expected) if isinstance(expected, str) else expected
            assert ours[field_name] == expected, f"{field_name}: {reason}"
            assert ours[field_name] != theirs[field_name], f"stale exception: {reason}"
        elif field_name == "text" and theirs["text"] is None:
            # An HTML-only message: get_body(("plain",)) has nothing; our text renders the HTML.
            assert ours["text"], "an HTML-only message gets a text rendering"
        else:
            assert ours[field_name] == theirs[field_name], field_name


def test_it_lists_only_exceptions_for_fixtures_that_exist() -> None:
    names = {path.name for path in CORPUS}
    assert set(EXCEPTIONS) <= names
