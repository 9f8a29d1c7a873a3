from django.contrib import admin

from audit.admin import StaffAuditedAdmin
from mailaccess.models import AppPassword


@admin.register(AppPassword)
class AppPasswordAdmin(StaffAuditedAdmin):
    """The staff view of app passwords: never the hash, only the last four characters."""

    list_display = ["name", "mailbox", "tenant", "last_four", "can_write", "created_at", "last_used_at", "revoked_at"]
    audit_resource_type = "app_password"
    list_filter = ["can_write", ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "mailbox__address", "last_four"]
    readonly_fields = ["tenant", "mailbox", "prefix", "last_four", "created_by", "created_at", "last_used_at"]
    exclude = ["secret_hash"]
