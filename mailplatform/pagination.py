"""Pagination shared by the API's list endpoints, and how its parameters are documented.

Every list is paged the same way: follow ``next`` (or pass its ``cursor``) to read on. A
cursor that was not handed out by us answers ``400 invalid_cursor`` everywhere, never 404
(nothing is "not found": the request itself is wrong).
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from typing import Any
from urllib.parse import parse_qs

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions
from rest_framework.exceptions import ErrorDetail
from rest_framework.pagination import Cursor, CursorPagination, _positive_int
from rest_framework.request import Request

# One wording for the same parameters on every list (events, audit, messages, mailboxes...).
CURSOR_DESCRIPTION = (
    "Opaque cursor of the next page, as handed out in the previous page's `next` link; "
    "a cursor not handed out by the API answers 400 `invalid_cursor`."
)
LIMIT_DESCRIPTION = "Page size (default {default}, at most {maximum})."
INVALID_CURSOR_MESSAGE = "The cursor is not valid."


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

    def decode_cursor(self, request: Request) -> Cursor | None:
        """DRF's decoding, but strict: its own skips stray characters and takes any
        undecodable text for "the first page", so a mangled cursor silently restarts a scan."""
        encoded = request.query_params.get(self.cursor_query_param)
        if encoded is None:
            return None
        try:
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

    def paginate_queryset(self, queryset: Any, request: Request, view: Any = None) -> Any:
        # A well-formed cursor whose position is not a value of the ordering field (forged).
        try:
            return super().paginate_queryset(queryset, request, view)
        except (DjangoValidationError, ValueError, TypeError, OverflowError):
            raise invalid_cursor(self.cursor_query_param) from None
