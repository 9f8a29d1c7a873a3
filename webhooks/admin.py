"""Staff view of webhooks. Signing secrets are never shown (not even encrypted)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from webhooks import clock
from webhooks.models import Attempt, Delivery, Endpoint

_SECRET_FIELDS = ("secret_encrypted", "previous_secret_encrypted")


@admin.register(Endpoint)
class EndpointAdmin(admin.ModelAdmin):
    list_display = ("host", "tenant", "description", "enabled", "disabled_reason", "failing_since", "created_at")
    list_filter = ("enabled", ("failing_since", admin.EmptyFieldListFilter), "created_at")
    search_fields = ("url", "description", "tenant__name", "tenant__slug", "id")
    list_select_related = ("tenant",)
    exclude = _SECRET_FIELDS
    readonly_fields = (
        "id",
        "tenant",
        "disabled_at",
        "failing_since",
        "secret_rotated_at",
        "previous_secret_expires_at",
        "created_at",
        "updated_at",
    )
    actions = ("disable_endpoints", "enable_endpoints")

    @admin.action(description="Disable the selected endpoints")
    def disable_endpoints(self, request: HttpRequest, queryset: QuerySet[Endpoint]) -> None:
        count = queryset.filter(enabled=True).update(
            enabled=False, disabled_at=clock.now(), disabled_reason=f"Disabled by staff ({request.user})."
        )
        self.message_user(request, f"Disabled {count} endpoint(s).", messages.SUCCESS)

    @admin.action(description="Enable the selected endpoints")
    def enable_endpoints(self, request: HttpRequest, queryset: QuerySet[Endpoint]) -> None:
        count = queryset.filter(enabled=False).update(
            enabled=True, disabled_at=None, disabled_reason="", failing_since=None
        )
        self.message_user(request, f"Enabled {count} endpoint(s).", messages.SUCCESS)


class AttemptInline(admin.TabularInline):
    model = Attempt
    extra = 0
    can_delete = False
    fields = ("number", "started_at", "duration_ms", "status_code", "succeeded", "error", "response_body")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = ("id", "event", "endpoint", "state", "origin", "attempts", "next_attempt_at", "last_status")
    list_filter = ("state", "origin", "created_at")
    search_fields = ("id", "event__public_id", "event__type", "endpoint__url", "tenant__name")
    list_select_related = ("event", "endpoint", "tenant")
    raw_id_fields = ("event", "endpoint", "tenant")
    readonly_fields = ("id", "claim", "lease_until", "delivered_at", "created_at", "updated_at")
    inlines = (AttemptInline,)
    actions = ("retry_now",)

    @admin.action(description="Retry now (new cycle of attempts)")
    def retry_now(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        count = queryset.exclude(state=Delivery.State.SENDING).update(
            state=Delivery.State.PENDING, attempts=0, next_attempt_at=clock.now(), origin=Delivery.Origin.RETRY
        )
        self.message_user(request, f"{count} delivery(ies) will be sent by the next dispatcher run.", messages.SUCCESS)


@admin.register(Attempt)
class AttemptAdmin(admin.ModelAdmin):
    list_display = ("delivery", "number", "started_at", "status_code", "succeeded", "duration_ms", "error")
    list_filter = ("succeeded", "status_code", "started_at")
    search_fields = ("delivery__id", "delivery__event__public_id", "error")
    raw_id_fields = ("delivery",)
    readonly_fields = ("delivery", "number", "started_at", "duration_ms", "status_code", "response_body", "error")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
