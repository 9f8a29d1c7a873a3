"""What every API view shares: the error shape, pagination, and the schema's permission notes.

Errors always look like ``{"error": {"code": "...", "message": "...", "details": {...}}}``;
``code`` is stable and meant for programs, ``message`` for people.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ObjectDoesNotExist, PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions
from rest_framework.parsers import JSONParser
from rest_framework.response import Response
from rest_framework.serializers import as_serializer_error
from rest_framework.views import exception_handler as drf_exception_handler

_FALLBACK_CODES = {
    400: "bad_request",
    401: "not_authenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "throttled",
}


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return {"error": error}


# Field-level codes that say "bad value" in general; the error code stays validation_error.
_GENERIC_CODES = frozenset(
    {
        "invalid",
        "required",
        "null",
        "blank",
        "max_length",
        "min_length",
        "max_value",
        "min_value",
        "invalid_choice",
        "unique",
        "read_only",
    }
)


def _django_validation_code(exc: DjangoValidationError) -> str | None:
    """A service's own specific code (``domain_not_empty``, ``lockout``) when it raised one."""
    errors = (
        [error for errors in exc.error_dict.values() for error in errors]
        if hasattr(exc, "error_dict")
        else (exc.error_list)
    )
    codes = {error.code for error in errors if error.code}
    return codes.pop() if len(codes) == 1 and not codes & _GENERIC_CODES else None


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    code: str | None = None
    if isinstance(exc, DjangoValidationError):
        code = _django_validation_code(exc)
        exc = exceptions.ValidationError(detail=as_serializer_error(exc))
    elif isinstance(exc, ObjectDoesNotExist | Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        # A refusal with a code of its own (tenants.access.TenantSuspended) keeps it.
        exc = exceptions.PermissionDenied(detail=str(exc) or None, code=getattr(exc, "code", None))

    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    assert isinstance(exc, exceptions.APIException)

    if isinstance(exc, exceptions.ValidationError):
        details: Any = exc.detail
        if isinstance(details, dict):
            # {"non_field_errors": [...]} alone reads better as the message itself.
            non_field = details.get("non_field_errors")
            message = str(non_field[0]) if non_field and len(details) == 1 else "The request is not valid."
        elif isinstance(details, list) and details:
            message, details = str(details[0]), {"non_field_errors": details}
        else:
            message = "The request is not valid."
        response.data = error_body(code or "validation_error", message, details)
        return response

    codes = exc.get_codes()
    if isinstance(codes, str) and codes not in {"error", "invalid"}:
        code = codes
    else:
        code = _FALLBACK_CODES.get(response.status_code, "error")
    response.data = error_body(code, str(exc.detail))
    return response


def json_error_response(request: HttpRequest, status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse(error_body(code, message), status=status)


class BoundedJSONParser(JSONParser):
    """JSON nested deeper than the decoder's recursion limit answers 400, not 500."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError("JSON parse error - nested too deeply.") from None
