"""Staff views of mailboxes, messages and attachments."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone

from audit.admin import ReadOnlyAdmin, StaffAuditedAdmin
from mailboxes.models import AccountBinding, AccountProvider, Attachment, Mailbox, MailboxPool, Message


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


# Mail is written by the pipeline only, and deleting goes through the retention services
# (events, blob purge), never a bare row delete: messages and attachments are read-only here.
class AttachmentInline(admin.TabularInline):  # type: ignore[type-arg]
    model = Attachment
    extra = 0
    fields = ("position", "filename", "content_type", "size", "is_inline", "sha256")
    readonly_fields = fields
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    """Metadata for support (where is a message, why was it quarantined); the bodies are
    left out of the admin on purpose."""

    list_display = ("received_at", "mailbox", "mail_from", "subject", "state", "source", "size", "has_attachments")
    list_filter = ("state", "source", "antivirus_verdict", "has_attachments", "is_read", "tls", "received_at")
    list_select_related = ("mailbox",)
    search_fields = (
        "=id",
        "=trace_id",
        "=message_id",
        "=sha256",
        "mailbox__address",
        "rcpt",
        "mail_from",
        "subject",
        "tenant__slug",
    )
    date_hierarchy = "received_at"
    show_full_result_count = False
    fields = (
        "id",
        "tenant",
        "mailbox",
        "state",
        "state_reason",
        "state_changed_at",
        "source",
        "mail_from",
        "rcpt",
        "tags",
        "remote_ip",
        "helo",
        "tls",
        "trace_id",
        "received_at",
        "subject",
        "from_address",
        "from_name",
        "date",
        "message_id",
        "thread_id",
        "size",
        "sha256",
        "storage_key",
        "has_attachments",
        "defects",
        "antivirus_verdict",
        "antivirus_signature",
        "antivirus_scanned_at",
        "is_read",
        "parsed_at",
        "indexed_at",
        "deleted_at",
        "purged_at",
        "created_at",
    )
    readonly_fields = fields
    inlines = (AttachmentInline,)


@admin.register(Attachment)
class AttachmentAdmin(ReadOnlyAdmin):
    list_display = ("filename", "content_type", "size", "is_inline", "message", "tenant")
    list_filter = ("is_inline", "content_type")
    list_select_related = ("message", "tenant")
    search_fields = ("filename", "=sha256", "=message__id", "tenant__slug")
    fields = ("id", "tenant", "message", "position", "filename", "content_type", "size", "sha256", "content_id")
    readonly_fields = fields


# --- Pools and bindings (mailboxes/bindings/): written through their services only -----------
@admin.register(MailboxPool)
class MailboxPoolAdmin(ReadOnlyAdmin):
    list_display = ("name", "tenant", "domain", "policy", "max_bindings_per_mailbox", "one_per_provider", "created_at")
    list_filter = ("policy", "one_per_provider", "auto_provision")
    search_fields = ("name", "tenant__slug", "domain__name")


@admin.register(AccountBinding)
class AccountBindingAdmin(ReadOnlyAdmin):
    # Never the link's hash or prefix: the link is the host's secret.
    list_display = ("account_ref", "provider", "tenant", "pool", "mailbox", "active", "created_at", "released_at")
    list_filter = ("active", "ended_reason", "provider")
    search_fields = ("account_ref", "mailbox__address", "tenant__slug")
    exclude = ("link_prefix", "link_hash")
    list_select_related = ("tenant", "pool", "mailbox")


@admin.register(AccountProvider)
class AccountProviderAdmin(ReadOnlyAdmin):
    list_display = ("name", "tenant", "updated_at")
    search_fields = ("name", "tenant__slug")
