from django.contrib import admin

from ingest.models import Connector, ConnectorFolder, Heartbeat, UploadIdempotencyKey


@admin.register(Heartbeat)
class HeartbeatAdmin(admin.ModelAdmin):
    list_display = ("kind", "node", "pid", "last_seen", "started_at")
    list_filter = ("kind",)
    search_fields = ("node",)
    ordering = ("kind", "node")


@admin.register(UploadIdempotencyKey)
class UploadIdempotencyKeyAdmin(admin.ModelAdmin):
    list_display = ("key", "tenant", "principal", "response_status", "created_at", "expires_at")
    list_filter = ("response_status",)
    search_fields = ("key", "principal")
    readonly_fields = ("fingerprint", "response_body")


class ConnectorFolderInline(admin.TabularInline):
    model = ConnectorFolder
    extra = 0
    readonly_fields = ("name", "uid_validity", "last_uid", "updated_at")
    can_delete = False


@admin.register(Connector)
class ConnectorAdmin(admin.ModelAdmin):
    """IMAP pull connectors across tenants: state, lease and errors; never a secret."""

    list_display = ("username", "host", "tenant", "mailbox", "state", "active", "lease_owner", "last_connected_at")
    list_filter = ("state", "active", "auth_type", "tls_mode")
    search_fields = ("username", "host", "mailbox__address")
    exclude = (
        "password_encrypted",
        "oauth_client_secret_encrypted",
        "oauth_refresh_token_encrypted",
        "oauth_access_token_encrypted",
    )
    readonly_fields = (
        "lease_owner", "lease_expires_at", "lease_token", "last_error", "last_error_kind", "last_error_at",
        "last_connected_at", "last_fetched_at", "generation",
    )  # fmt: skip
    raw_id_fields = ("tenant", "mailbox")
    inlines = [ConnectorFolderInline]
