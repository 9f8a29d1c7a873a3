"""Staff views of mailboxes (and, once ingest lands, their messages)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone

from audit.admin import StaffAuditedAdmin
from mailboxes.models import Mailbox


class MailboxLiveFilter(admin.SimpleListFilter):
    title = "live"
    parameter_name = "live"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Receiving"), ("no", "Expired")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "yes":
            return queryset.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))
        if self.value() == "no":
            return queryset.filter(expires_at__lte=timezone.now())
        return queryset


@admin.register(Mailbox)
class MailboxAdmin(StaffAuditedAdmin):
    """Mailboxes are created through the API or console, which record ``mailbox.created``.

    Staff may rename one, change its expiry and retention, or delete it (audited).
    """

    audit_resource_type = "mailbox"
    list_display = ("address", "name", "tenant", "kind", "is_catch_all", "expires_at", "created_at")
    list_filter = ("kind", "is_catch_all", MailboxLiveFilter, "domain__state", "tenant__plan", "created_at")
    list_select_related = ("tenant",)
    search_fields = ("address", "name", "tenant__name", "tenant__slug", "domain__name", "=id")
    fields = (
        "id",
        "address",
        "tenant",
        "domain",
        "local_part",
        "kind",
        "is_catch_all",
        "name",
        "expires_at",
        "retention_days",
        "created_at",
        "updated_at",
    )
    readonly_fields = (
        "id",
        "address",
        "tenant",
        "domain",
        "local_part",
        "kind",
        "is_catch_all",
        "created_at",
        "updated_at",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
