"""OpenAPI generation: the schema says what the API really answers.

- every operation states the key permission it needs (description and ``x-required-permission``);
- every operation lists its error answers (400, 401, 403, 404, 429, 503 where they can happen),
  all in the one ``Error`` shape of :mod:`mailplatform.api`;
- request bodies of :class:`mailplatform.api.StrictSerializer` refuse unknown fields
  (``additionalProperties: false``) and carry the constraints the server checks between fields;
- the two long-polling endpoints, plain async Django views that drf-spectacular cannot see,
  are described here.

tests/test_schemathesis.py holds the API to this schema.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import get_doc
from rest_framework import serializers

ERROR_COMPONENT = "Error"
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Every error answer. `code` is stable and meant for programs, `message` for people.",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "Stable, e.g. validation_error, unknown_field, not_found"},
                "message": {"type": "string"},
                "details": {
                    "type": "object",
                    "additionalProperties": {},
                    "description": "Field name to its problems, for validation errors",
                },
            },
            "required": ["code", "message"],
        }
    },
    "required": ["error"],
}
_ERROR_REF = {"$ref": f"#/components/schemas/{ERROR_COMPONENT}"}

ERROR_DESCRIPTIONS = {
    "400": "The request is not valid (validation_error, unknown_field, read_only_field, invalid_cursor...)",
    "401": "No API key, or one that is not valid, expired or revoked",
    "403": "The key lacks the permission, the tenant is suspended, or the address is not allowed",
    "404": "Not found, or outside the key's tenant or resource allow-list",
    "408": "Nothing arrived before the timeout",
    "413": "The message is larger than this tenant accepts",
    "415": "The request body's content type is not accepted",
    "422": "The request cannot be carried out as sent",
    "429": "Too many requests (rate_limited): retry after the number of seconds in Retry-After",
    "503": "Temporarily unavailable (database or spool); try again later",
}
_WRITE_METHODS = {"post", "put", "patch"}


class PermissionAutoSchema(AutoSchema):
    """Permission notes, strict request bodies and cross-field constraints."""

    def get_description(self) -> str:  # type: ignore[override]
        from tenants.api.permissions import describe_permission

        base = super().get_description()
        note = describe_permission(self.view, self.method)
        return f"{base}\n\n{note}".strip() if base else note

    def get_operation(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        operation = super().get_operation(*args, **kwargs)
        if operation is not None:
            from tenants.api.permissions import required_permission

            permission = required_permission(self.view, self.method)
            operation["x-required-permission"] = permission if isinstance(permission, str) else None
        return operation

    def _map_serializer(self, serializer: Any, direction: Any, bypass_extensions: bool = False) -> dict[str, Any]:
        from mailplatform.api import StrictSerializer

        schema: dict[str, Any] = super()._map_serializer(serializer, direction, bypass_extensions)
        strict = serializer if isinstance(serializer, type) else type(serializer)
        if schema.get("description") and schema["description"] == get_doc(StrictSerializer):
            del schema["description"]  # the base class's docstring is not the body's description
        if direction == "request" and issubclass(strict, StrictSerializer):
            schema["additionalProperties"] = False
            schema.update(strict.schema_constraints)
        return schema

    def _map_serializer_field(self, field: Any, direction: Any, bypass_extensions: bool = False) -> Any:
        schema = super()._map_serializer_field(field, direction, bypass_extensions)
        # DRF refuses an empty list where allow_empty=False; drf-spectacular does not say so.
        if (
            isinstance(schema, dict)
            and isinstance(field, serializers.ListField)
            and not field.allow_empty
            and schema.get("type") == "array"
        ):
            schema["minItems"] = max(schema.get("minItems", 0), 1)
        return schema


def error_responses_hook(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular postprocessing: the waiting endpoints, then every operation's errors."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas[ERROR_COMPONENT] = ERROR_SCHEMA
    _waiting_paths_add(result)
    for path, item in result.get("paths", {}).items():
        for method, operation in item.items():
            if method in {"get", "post", "put", "patch", "delete"}:
                _errors_attach(path, method, operation)
    return result


def _errors_attach(path: str, method: str, operation: dict[str, Any]) -> None:
    responses = operation.setdefault("responses", {})
    authenticated = bool(operation.get("security"))
    has_query = any(parameter.get("in") == "query" for parameter in operation.get("parameters", []))
    wanted = ["503"]
    if has_query or "requestBody" in operation or method in _WRITE_METHODS:
        wanted.append("400")
    if authenticated:
        wanted += ["401", "403"]
    if "{" in path:
        wanted.append("404")
    if "requestBody" in operation:
        wanted.append("415")
    for code in wanted:
        responses.setdefault(code, {})
    for code, response in responses.items():
        if code.isdigit() and int(code) >= 400 and "content" not in response:
            response["description"] = response.get("description") or ERROR_DESCRIPTIONS.get(code, "Error")
            response["content"] = {"application/json": {"schema": _ERROR_REF}}
            if code in {"429", "503"}:
                response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait"}}
    operation["responses"] = dict(sorted(responses.items()))


# --- The long-polling endpoints (mailboxes.api.waiting) --------------------------------
CODE_LATEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "description": "The newest code of the message"},
        "codes": {"type": "array", "items": {"type": "string"}},
        "message": {"type": "string", "format": "uuid"},
        "mailbox": {"type": "string", "format": "uuid"},
        "subject": {"type": "string"},
        "from": {"type": "string"},
        "received_at": {"type": "string", "format": "date-time"},
        "links": {"type": "array", "items": {"$ref": "#/components/schemas/Link"}},
    },
    "required": ["code", "codes", "message", "mailbox", "subject", "from", "received_at", "links"],
}

_AFTER_MESSAGE = {
    "name": "after",
    "in": "query",
    "schema": {"type": "string"},
    "description": "Only mail received after this point: an ISO 8601 time, or a message id (exclusive).",
}


def _timeout_parameter(name: str, default: float, description: str) -> dict[str, Any]:
    from mailboxes.api.waiting import MAX_TIMEOUT

    return {
        "name": name,
        "in": "query",
        "schema": {"type": "number", "minimum": 0, "maximum": MAX_TIMEOUT, "default": default},
        "description": description,
    }


def _waiting_operation(view: Any, operation_id: str, **fields: Any) -> dict[str, Any]:
    from tenants.api.permissions import describe_permission, required_permission

    docstring = " ".join((view.__doc__ or "").split())
    return {
        "operationId": operation_id,
        "description": f"{docstring}\n\n{describe_permission(view(), 'get')}",
        "tags": ["messages"],
        "security": [{"ApiKey": []}],
        "x-required-permission": required_permission(view(), "get"),
        **fields,
    }


def _waiting_paths_add(result: dict[str, Any]) -> None:
    from mailboxes.api.waiting import DEFAULT_TIMEOUT, CodeLatestView, MessageWaitView

    prefix = "/api/v1"
    schemas = result["components"]["schemas"]
    schemas["CodeLatest"] = CODE_LATEST_SCHEMA
    paths = result.setdefault("paths", {})
    paths[f"{prefix}/messages/wait/"] = {
        "get": _waiting_operation(
            MessageWaitView,
            "messages_wait",
            parameters=[
                {
                    "name": "mailbox",
                    "in": "query",
                    "schema": {"type": "string", "format": "uuid"},
                    "description": "Only this mailbox",
                },
                _AFTER_MESSAGE,
                {"name": "q", "in": "query", "schema": {"type": "string"}, "description": "Search, as on the list"},
                _timeout_parameter("timeout", DEFAULT_TIMEOUT, "Seconds to wait for a message"),
            ],
            responses={
                "200": {
                    "description": "The matching message",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/MessageDetail"}}},
                },
                "404": {"description": "No such mailbox, or the message was deleted before it could be sent"},
                "408": {"description": ERROR_DESCRIPTIONS["408"]},
            },
        )
    }
    paths[f"{prefix}/mailboxes/{{id}}/codes/latest/"] = {
        "get": _waiting_operation(
            CodeLatestView,
            "mailboxes_codes_latest",
            parameters=[
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}},
                _timeout_parameter("wait", 0.0, "Seconds to wait for a code when there is none yet (0: answer now)"),
                _AFTER_MESSAGE,
            ],
            responses={
                "200": {
                    "description": "The newest code",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CodeLatest"}}},
                },
                "404": {"description": "No such mailbox, or no message with a code yet (no_code)"},
                "408": {"description": ERROR_DESCRIPTIONS["408"]},
            },
        )
    }
    _binding_code_paths_add(paths, schemas)
    result["paths"] = dict(sorted(paths.items()))


def _binding_code_paths_add(paths: dict[str, Any], schemas: dict[str, Any]) -> None:
    """The code proxy of account bindings (mailboxes.api.binding_codes): the same long-poll."""
    from mailboxes.api.binding_codes import AccountCodeLatestView, LinkCodeLatestView

    schemas["BindingCodeLatest"] = {
        "type": "object",
        "properties": {
            **CODE_LATEST_SCHEMA["properties"],
            "binding": {"type": "string", "format": "uuid"},
            "account_ref": {"type": "string"},
            "provider": {"type": "string"},
        },
        "required": [*CODE_LATEST_SCHEMA["required"], "binding", "account_ref", "provider"],
    }
    common = [
        _timeout_parameter("wait", 0.0, "Seconds to wait for a code when there is none yet (0: answer now)"),
        {
            "name": "since",
            "in": "query",
            "schema": {"type": "string", "format": "date-time"},
            "description": "Only codes received after this time (never before the binding was made)",
        },
    ]
    responses = {
        "200": {
            "description": "The newest code for the account",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BindingCodeLatest"}}},
        },
        "404": {"description": "No such active binding, or no code since it was made (no_code)"},
        "408": {"description": ERROR_DESCRIPTIONS["408"]},
        "409": {"description": "A shared mailbox and a provider without rules (provider_not_configured)"},
        "429": {"description": "Too many code requests for this key or this account (rate_limited)"},
    }
    paths["/api/v1/links/{link}/codes/latest/"] = {
        "get": _waiting_operation(
            LinkCodeLatestView,
            "links_codes_latest",
            parameters=[
                {"name": "link", "in": "path", "required": True, "schema": {"type": "string"}},
                *common,
            ],
            responses=responses,
        )
    }
    paths["/api/v1/accounts/{account_ref}/codes/latest/"] = {
        "get": _waiting_operation(
            AccountCodeLatestView,
            "accounts_codes_latest",
            parameters=[
                {"name": "account_ref", "in": "path", "required": True, "schema": {"type": "string"}},
                {
                    "name": "provider",
                    "in": "query",
                    "schema": {"type": "string"},
                    "description": "Only if bound for it",
                },
                *common,
            ],
            responses=responses,
        )
    }
