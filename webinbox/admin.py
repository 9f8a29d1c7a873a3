"""Staff view of sign-in links. Only a hash of each token is stored, and it is never shown."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from audit.admin import StaffAuditedAdmin
from webinbox.models import LoginToken


class LoginTokenStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("unused", "Unused and valid"), ("used", "Used"), ("expired", "Expired unused")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        now = timezone.now()
        if self.value() == "unused":
            return queryset.filter(used_at__isnull=True, expires_at__gt=now)
        if self.value() == "used":
            return queryset.filter(used_at__isnull=False)
        if self.value() == "expired":
            return queryset.filter(used_at__isnull=True, expires_at__lte=now)
        return queryset


@admin.register(LoginToken)
class LoginTokenAdmin(StaffAuditedAdmin):
    """Read-only: a link made here could never be sent (the token is not stored). Staff may
    delete one, which cancels it."""

    audit_resource_type = "login_token"
    list_display = ("user", "created_at", "expires_at", "used_at")
    list_filter = (LoginTokenStateFilter, "created_at")
    list_select_related = ("user",)
    search_fields = ("user__email", "=id")
    fields = ("id", "user", "created_at", "expires_at", "used_at")
    readonly_fields = fields
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
