"""The DRF side of access: each view declares the key permission of each action.

Views set ``required_permissions``, a mapping from viewset action (or lowercase HTTP method
for plain views) to a permission name, or None where any key of the tenant may act. An
action missing from the mapping is refused, so a new action cannot ship unguarded.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from rest_framework import exceptions
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from audit import context
from tenants.access import IpNotAllowed, Principal, TenantSuspended, principal_ensure_usable

_UNDECLARED = object()


def required_permission(view: Any, method: str) -> Any:
    mapping = getattr(view, "required_permissions", None)
    if mapping is None:
        raise ImproperlyConfigured(f"{type(view).__name__} must declare required_permissions")
    action = getattr(view, "action", None)
    if action is None and getattr(view, "action_map", None):
        action = view.action_map.get(method.lower())
    key = action or method.lower()
    return mapping.get(key, _UNDECLARED)


def describe_permission(view: Any, method: str) -> str:
    try:
        permission = required_permission(view, method)
    except ImproperlyConfigured:
        return ""
    if permission is _UNDECLARED:
        return "**Permission:** not available to API keys."
    if permission is None:
        return "**Permission:** any key of the tenant; results are limited to the key's resource allow-list."
    return f"**Permission:** `{permission}`; objects outside the key's resource allow-list answer 404."


class KeyPermission(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        principal = request.user
        if not isinstance(principal, Principal):
            raise exceptions.NotAuthenticated("Send an API key as 'Authorization: Bearer mp_...'.")
        try:
            principal_ensure_usable(principal, context.current().ip)
        except (TenantSuspended, IpNotAllowed) as refusal:
            raise exceptions.PermissionDenied(str(refusal), code=refusal.code) from None
        if request.method == "OPTIONS":
            return True
        permission = required_permission(view, request.method or "get")
        if permission is _UNDECLARED:
            # An unsupported method (no viewset action, no handler on a plain view): DRF answers 405.
            if getattr(view, "action", "") is None or not hasattr(view, (request.method or "get").lower()):
                return True
            raise exceptions.PermissionDenied("This action is not available to API keys.")
        if permission is not None and not principal.has_perm(permission):
            raise exceptions.PermissionDenied(
                f"This API key lacks the {permission} permission.", code="missing_permission"
            )
        return True
