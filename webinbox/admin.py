"""Staff views of sign-in links, temporary inboxes and session generations.

Only hashes of link and inbox tokens are stored, and they are never shown.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from audit.admin import ReadOnlyAdmin, StaffAuditedAdmin
from tenants.access import session_is_limited
from webinbox.models import LoginToken, SessionGeneration, TempInbox
from webinbox.staff_login import StaffAuthenticationForm

# The admin's password sign-in is throttled and audited (webinbox/staff_login.py).
admin.site.login_form = StaffAuthenticationForm
_site_has_permission = admin.site.has_permission


def _staff_session_has_permission(request: HttpRequest) -> bool:
    # A session a tenant's SSO opened is that tenant's alone (tenants/access.py): even if its
    # user has since been made staff, the admin wants the staff sign-in of its own.
    return _site_has_permission(request) and not session_is_limited(request.session)


admin.site.has_permission = _staff_session_has_permission  # type: ignore[method-assign]


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


@admin.register(TempInbox)
class TempInboxAdmin(StaffAuditedAdmin):
    """Read-only; deleting one revokes its link (the mailbox and mail stay until the sweeper)."""

    audit_resource_type = "temp_inbox"
    list_display = ("mailbox", "created_at", "created_ip", "extensions", "expires_at")
    list_filter = ("created_at",)
    list_select_related = ("mailbox",)
    search_fields = ("mailbox__address", "=created_ip")
    fields = ("mailbox", "created_at", "created_ip", "extensions", "expires_at")
    readonly_fields = fields
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="expires")
    def expires_at(self, obj: TempInbox) -> Any:
        return obj.mailbox.expires_at

    def audit_tenant_id(self, obj: Any) -> Any:
        return obj.mailbox.tenant_id


@admin.register(SessionGeneration)
class SessionGenerationAdmin(ReadOnlyAdmin):
    """How many times each user signed out everywhere; written only by that service."""

    list_display = ("user", "generation", "changed_at")
    list_select_related = ("user",)
    search_fields = ("user__email",)
    readonly_fields = ("user", "generation", "changed_at")
