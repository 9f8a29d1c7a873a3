"""What every API view shares: the error shape, pagination, and the schema's permission notes.

Errors always look like ``{"error": {"code": "...", "message": "...", "details": {...}}}``;
``code`` is stable and meant for programs, ``message`` for people.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from django.core.exceptions import ObjectDoesNotExist, PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions, serializers
from rest_framework.exceptions import ErrorDetail
from rest_framework.parsers import JSONParser
from rest_framework.response import Response
from rest_framework.serializers import as_serializer_error

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
    429: "rate_limited",
}
# The one code of every 429 (sending, code requests, temporary inboxes), with Retry-After;
# DRF's Throttled says "throttled" of itself.
RATE_LIMITED = "rate_limited"


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


# Field-level codes that name the whole error: a program reacts to them, not to the message.
_PROMOTED_CODES = ("unknown_field", "read_only_field", "invalid_cursor")


def _promoted_code(details: Any) -> str | None:
    """``unknown_field`` (or another of _PROMOTED_CODES) when every field error has that code."""
    codes: set[str] = set()

    def collect(value: Any) -> None:
        if isinstance(value, ErrorDetail):
            codes.add(str(value.code))
        elif isinstance(value, Mapping):
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    collect(details)
    if codes and codes <= {"unknown_field", "read_only_field"}:
        return "unknown_field" if "unknown_field" in codes else "read_only_field"
    return next((code for code in _PROMOTED_CODES if codes == {code}), None)


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

    # Imported here: rest_framework.views reads the parser setting, which names this module.
    from rest_framework.views import exception_handler as drf_exception_handler

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
        promoted = None if code else _promoted_code(details)
        if promoted in {"unknown_field", "read_only_field"} and isinstance(details, dict):
            message = f"Fields not accepted here: {', '.join(sorted(details))}."
        response.data = error_body(code or promoted or "validation_error", message, details)
        return response

    codes = exc.get_codes()
    if isinstance(exc, exceptions.Throttled):
        codes = RATE_LIMITED
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


class StrictSerializer(serializers.Serializer[Any]):
    """An input serializer that refuses fields it does not take, instead of dropping them.

    A client that sends ``{"retention_days": 7}`` where it is not accepted, or misspells a
    field, must learn it: ``400 unknown_field``, or ``400 read_only_field`` for a field the
    resource shows but cannot be changed (those of ``output_serializer_class``), with each
    field named in ``details``. The schema says the same (``additionalProperties: false``).
    """

    # The serializer that shows the resource: its fields are known, but read-only here.
    output_serializer_class: ClassVar[type[serializers.Serializer[Any]] | None] = None
    # Extra JSON Schema keywords for the request body (anyOf/oneOf between fields).
    schema_constraints: ClassVar[dict[str, Any]] = {}
    _shown_fields: ClassVar[frozenset[str] | None] = None

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            fields_refused(data, writable=self.fields, shown=self.shown_fields())
        return super().to_internal_value(data)

    @classmethod
    def shown_fields(cls) -> frozenset[str]:
        # Built once per class: the output serializer's fields are its class's alone, and building
        # a ModelSerializer's fields is most of what validating a small body costs.
        shown = cls.__dict__.get("_shown_fields")
        if shown is None:
            output = cls.output_serializer_class
            shown = frozenset(output().fields) if output is not None else frozenset()
            cls._shown_fields = shown
        return shown


def fields_refused(
    data: Mapping[str, Any], *, writable: Mapping[str, Any] | None = None, shown: frozenset[str] = frozenset()
) -> None:
    """Raise 400 ``unknown_field``/``read_only_field`` for every key of ``data`` not writable."""
    errors: dict[str, list[ErrorDetail]] = {}
    for name in data:
        field = (writable or {}).get(name)
        if field is not None and not getattr(field, "read_only", False):
            continue
        if field is not None or name in shown:
            errors[str(name)] = [ErrorDetail("This field cannot be changed.", code="read_only_field")]
        else:
            errors[str(name)] = [ErrorDetail("This field is not known.", code="unknown_field")]
    if errors:
        raise exceptions.ValidationError(errors)


def no_body_expected(request: Any) -> None:
    """For actions that take no body: fields sent anyway answer 400 ``unknown_field``.

    Only a JSON body is read (the API's one parser): any other body, such as the empty form
    some clients send with every POST, means nothing here and is left alone as before.
    """
    try:
        data = request.data
    except exceptions.UnsupportedMediaType:
        return
    if isinstance(data, Mapping) and data:
        fields_refused(data)
