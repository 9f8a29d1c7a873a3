"""Pagination shared by the API's list endpoints, and how its parameters are documented.

Every list is paged the same way: follow ``next`` (or pass its ``cursor``) to read on. A
cursor that was not handed out by us answers ``400 invalid_cursor`` everywhere, never 404
(nothing is "not found": the request itself is wrong). "Handed out by us" is checked, not
assumed: every cursor carries a MAC under a key derived from SECRET_KEY (:func:`cursor_sign`),
so a well-formed but made-up position (``o=3``, another event's sequence number) is refused too.
"""

from __future__ import annotations

import binascii
import hmac
import re
from base64 import b64decode, b64encode, urlsafe_b64encode
from typing import Any
from urllib.parse import parse_qs, urlencode

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.utils.crypto import salted_hmac
from rest_framework import exceptions
from rest_framework.exceptions import ErrorDetail
from rest_framework.pagination import Cursor, CursorPagination, _positive_int
from rest_framework.request import Request
from rest_framework.utils.urls import replace_query_param

# One wording for the same parameters on every list (events, audit, messages, mailboxes...).
CURSOR_DESCRIPTION = (
    "Opaque cursor of the next page, as handed out in the previous page's `next` link; "
    "a cursor not handed out by the API answers 400 `invalid_cursor`."
)
LIMIT_DESCRIPTION = (
    "Page size (default {default}, at most {maximum}: a larger one is served as {maximum}); "
    "anything but a whole number from 1 answers 400 `validation_error`."
)
INVALID_CURSOR_MESSAGE = "The cursor is not valid."
_WHOLE_NUMBER = re.compile(r"[0-9]+")


def limit_parse(value: str | None, *, default: int, maximum: int, name: str = "limit") -> int:
    """The page size a list was asked for: absent or empty, ``default``; above ``maximum``,
    ``maximum`` (documented); anything but a whole number from 1 answers 400 naming ``name``,
    rather than being quietly served as the default page."""
    if value is None or value == "":
        return default
    if not _WHOLE_NUMBER.fullmatch(value) or int(value) < 1:
        raise exceptions.ValidationError({name: [f"Must be a whole number from 1 (at most {maximum} are served)."]})
    return min(int(value), maximum)


def limit_parameter_schema(default: int) -> dict[str, Any]:
    """The ``limit`` query parameter's schema (no maximum: a larger one is served at the maximum)."""
    return {"type": "integer", "minimum": 1, "default": default}


# The MAC's key is SECRET_KEY under this purpose, so it signs nothing else (sessions, links).
_CURSOR_SALT = "mailplatform.pagination.cursor"
_CURSOR_MAC_BYTES = 12  # 96 bits: guessing one is hopeless, and the cursor stays short


def _cursor_mac(value: str, secret: str) -> str:
    digest = salted_hmac(_CURSOR_SALT, value, secret=secret, algorithm="sha256").digest()
    return urlsafe_b64encode(digest[:_CURSOR_MAC_BYTES]).decode("ascii").rstrip("=")


def cursor_sign(value: str) -> str:
    """``value`` (the position, base64) with its MAC appended: the cursor handed out."""
    return f"{value}.{_cursor_mac(value, settings.SECRET_KEY)}"


def cursor_unsign(cursor: str) -> str:
    """The position inside a cursor :func:`cursor_sign` made; ValueError for any other.

    A cursor signed under a key in SECRET_KEY_FALLBACKS still counts, so rotating the key
    does not break a client half-way through a list."""
    value, dot, mac = cursor.rpartition(".")
    if not dot or not value:
        raise ValueError("unsigned cursor")
    for secret in (settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", ())):
        if hmac.compare_digest(mac.encode("ascii", "replace"), _cursor_mac(value, secret).encode("ascii")):
            return value
    raise ValueError("cursor not handed out by the API")


def invalid_cursor(parameter: str = "cursor") -> exceptions.ValidationError:
    """The one error every list answers for a cursor it did not hand out."""
    return exceptions.ValidationError({parameter: [ErrorDetail(INVALID_CURSOR_MESSAGE, code="invalid_cursor")]})


class CreatedCursorPagination(CursorPagination):
    """Newest first; an opaque ``cursor`` parameter, stable while rows are added."""

    ordering: Any = ("-created_at", "-pk")
    page_size = 50
    page_size_query_param = "limit"
    max_page_size = 200
    cursor_query_description = CURSOR_DESCRIPTION

    @property
    def page_size_query_description(self) -> str:  # type: ignore[override]
        return LIMIT_DESCRIPTION.format(default=self.page_size, maximum=self.max_page_size)

    def get_page_size(self, request: Request) -> int:
        """:func:`limit_parse`: DRF's own serves a bad ``limit`` as the default page, silently."""
        return limit_parse(
            request.query_params.get(self.page_size_query_param),
            default=self.page_size,
            maximum=self.max_page_size,
            name=self.page_size_query_param,
        )

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters: list[dict[str, Any]] = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"] = limit_parameter_schema(self.page_size)
        return parameters

    def decode_cursor(self, request: Request) -> Cursor | None:
        """DRF's decoding, but strict: its own skips stray characters and takes any
        undecodable text for "the first page", so a mangled cursor silently restarts a scan."""
        signed = request.query_params.get(self.cursor_query_param)
        if signed is None:
            return None
        try:
            encoded = cursor_unsign(signed)
            querystring = b64decode(encoded.encode("ascii"), validate=True).decode("ascii")
            tokens = parse_qs(querystring, keep_blank_values=True, strict_parsing=True)
            if not tokens or set(tokens) - {"o", "r", "p"} or any(len(values) != 1 for values in tokens.values()):
                raise ValueError(querystring)
            offset = _positive_int(tokens.get("o", ["0"])[0], cutoff=self.offset_cutoff)
            reverse = bool(int(tokens.get("r", ["0"])[0]))
            position = tokens.get("p", [None])[0]
        except (TypeError, ValueError, UnicodeError, binascii.Error):
            raise invalid_cursor(self.cursor_query_param) from None
        return Cursor(offset=offset, reverse=reverse, position=position)  # type: ignore[arg-type]  # DRF's stub

    def encode_cursor(self, cursor: Cursor) -> str:
        """DRF's encoding (the same three tokens), signed with :func:`cursor_sign`."""
        tokens: dict[str, str] = {}
        if cursor.offset != 0:
            tokens["o"] = str(cursor.offset)
        if cursor.reverse:
            tokens["r"] = "1"
        if cursor.position is not None:
            tokens["p"] = str(cursor.position)
        encoded = b64encode(urlencode(tokens, doseq=True).encode("ascii")).decode("ascii")
        return replace_query_param(str(self.base_url), self.cursor_query_param, cursor_sign(encoded))

    def paginate_queryset(self, queryset: Any, request: Request, view: Any = None) -> Any:
        # A well-formed cursor whose position is not a value of the ordering field (forged).
        try:
            return super().paginate_queryset(queryset, request, view)
        except (DjangoValidationError, ValueError, TypeError, OverflowError):
            raise invalid_cursor(self.cursor_query_param) from None
