from django.contrib import admin

from ingest.models import Heartbeat, UploadIdempotencyKey


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
