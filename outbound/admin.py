from django.contrib import admin

from outbound.models import DkimKey, OutboundMessage, Recipient, Suppression


@admin.register(DkimKey)
class DkimKeyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("selector", "domain", "algorithm", "state", "published", "created_at")
    list_filter = ("state", "algorithm", "published")
    search_fields = ("selector", "domain__name")
    exclude = ("private_key_encrypted",)  # the secret never shows, even encrypted
    readonly_fields = ("public_key", "last_checked_at", "last_check_error", "activated_at", "retired_at")


class RecipientInline(admin.TabularInline):  # type: ignore[type-arg]
    model = Recipient
    extra = 0
    fields = ("address", "state", "attempts", "next_attempt_at", "last_response", "remote_host")
    readonly_fields = fields
    can_delete = False


@admin.register(OutboundMessage)
class OutboundMessageAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("from_address", "subject", "tenant", "source", "size", "created_at")
    list_filter = ("source",)
    search_fields = ("from_address", "subject", "message_id")
    readonly_fields = ("tenant", "domain", "mailbox", "sent_message", "message_id", "mail_from", "size")
    inlines = [RecipientInline]


@admin.register(Recipient)
class RecipientAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("address", "state", "attempts", "next_attempt_at", "tenant")
    list_filter = ("state",)
    search_fields = ("address",)
    raw_id_fields = ("message",)


@admin.register(Suppression)
class SuppressionAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("address", "reason", "tenant", "created_at")
    list_filter = ("reason",)
    search_fields = ("address",)
