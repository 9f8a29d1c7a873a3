"""OpenAPI generation: every operation states the key permission it needs."""

from __future__ import annotations

from typing import Any

from drf_spectacular.openapi import AutoSchema


class PermissionAutoSchema(AutoSchema):
    """Adds the key permission each operation needs to its description and as an extension."""

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
