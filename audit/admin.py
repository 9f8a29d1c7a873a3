"""Staff views of the event log and the audit trail, and the audited ModelAdmin base.

Event and AuditEntry are append-only: staff may read them, never add, change or delete.
Every other app's admin derives from :class:`StaffAuditedAdmin`, so each write a member of
staff makes through the admin leaves an AuditEntry with actor type "staff".
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.contrib import admin
from django.core.exceptions import FieldDoesNotExist
from django.db import models, transaction
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest

from audit.models import AuditEntry, Event
from audit.services import SECRET_KEYS, Actor, audit_entry_record

admin.site.site_header = "mailplatform staff"
admin.site.site_title = "mailplatform staff"
admin.site.index_title = "Everything, across tenants"

# Field names whose values never enter an audit summary, whatever the model.
_NEVER_SUMMARIZED = SECRET_KEYS | {"password", "secret_hash", "token_hash", "last_login"}


def staff_actor(request: HttpRequest) -> Actor:
    """The audit trail's view of the member of staff making this admin request."""
    user: Any = request.user
    return Actor(type=AuditEntry.ActorType.STAFF, label=str(getattr(user, "email", "") or user), user_id=user.pk)


def _plain(value: Any) -> Any:
    """A JSON-friendly form of a field value (model instances by primary key)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, models.Model):
        return str(value.pk)
    if isinstance(value, (UUID, Decimal)):
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple, set, frozenset, QuerySet)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return str(value)


class StaffAuditedAdmin(admin.ModelAdmin):
    """A ModelAdmin whose saves and deletes are recorded as staff AuditEntries.

    ``audit_resource_type`` names the resource as the services do (``api_key``, ``domain``);
    the action is ``<resource>.create|update|delete``. Summaries hold the changed fields only
    (all concrete fields for a delete), never a field named like a secret.
    """

    audit_resource_type: str = ""

    # --- what an entry says ------------------------------------------------------------
    def audit_resource(self) -> str:
        return self.audit_resource_type or self.model._meta.model_name or "object"

    def audit_tenant_id(self, obj: models.Model) -> Any:
        """The tenant the object belongs to: itself for a Tenant, ``tenant_id`` otherwise."""
        if obj._meta.label == "tenants.Tenant":
            return obj.pk
        return getattr(obj, "tenant_id", None)

    def audit_summary(self, obj: models.Model, names: Iterable[str]) -> dict[str, Any]:
        summary: dict[str, Any] = {}
        for name in names:
            if name in _NEVER_SUMMARIZED:
                continue
            try:
                field = obj._meta.get_field(name)
            except FieldDoesNotExist:  # a form-only field: nothing stored to summarize
                continue
            if field.many_to_many:
                summary[name] = [str(pk) for pk in getattr(obj, name).values_list("pk", flat=True)] if obj.pk else []
            elif field.concrete:
                summary[name] = _plain(getattr(obj, getattr(field, "attname", name)))
        return summary

    def audit_record(
        self,
        request: HttpRequest,
        obj: models.Model,
        verb: str,
        *,
        before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
    ) -> None:
        audit_entry_record(
            tenant_id=self.audit_tenant_id(obj),
            actor=staff_actor(request),
            action=f"{self.audit_resource()}.{verb}",
            resource_type=self.audit_resource(),
            resource_id=obj.pk,
            before=before,
            after=after,
        )

    # --- the hooks the admin calls -----------------------------------------------------
    def save_model(self, request: HttpRequest, obj: Any, form: ModelForm, change: bool) -> None:
        changed = [name for name in form.changed_data if name not in _NEVER_SUMMARIZED]
        before = None
        if change and obj.pk is not None:
            stored = type(obj)._default_manager.filter(pk=obj.pk).first()
            before = self.audit_summary(stored, changed) if stored is not None else None
        with transaction.atomic():
            super().save_model(request, obj, form, change)
            if change and not changed:
                return
            after = self.audit_summary(obj, changed if change else [f.name for f in obj._meta.concrete_fields])
            self.audit_record(request, obj, "update" if change else "create", before=before, after=after)

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        with transaction.atomic():
            self.audit_record(
                request, obj, "delete", before=self.audit_summary(obj, [f.name for f in obj._meta.concrete_fields])
            )
            super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        with transaction.atomic():
            for obj in queryset:
                self.audit_record(
                    request,
                    obj,
                    "delete",
                    before=self.audit_summary(obj, [f.name for f in obj._meta.concrete_fields]),
                )
            super().delete_queryset(request, queryset)


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """No add, change or delete for anyone, superusers included: rows written elsewhere only."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class AppendOnlyAdmin(ReadOnlyAdmin):
    """Read-only for everyone, superusers included: the log is append-only."""

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [field.name for field in self.model._meta.concrete_fields]


@admin.register(Event)
class EventAdmin(AppendOnlyAdmin):
    list_display = ("public_id", "type", "tenant", "timestamp", "trace_id", "mailbox_id")
    list_filter = ("type", "timestamp", "tenant__plan")
    list_select_related = ("tenant",)
    search_fields = ("public_id", "type", "trace_id", "tenant__slug", "tenant__name", "=mailbox_id", "=message_id")
    date_hierarchy = "timestamp"
    ordering = ("-seq",)
    show_full_result_count = False


@admin.register(AuditEntry)
class AuditEntryAdmin(AppendOnlyAdmin):
    list_display = ("created_at", "actor_type", "actor_label", "action", "resource_type", "resource_id", "tenant", "ip")
    list_filter = ("actor_type", "anonymous", "resource_type", "action", "created_at")
    list_select_related = ("tenant",)
    search_fields = ("actor_label", "action", "resource_id", "correlation_id", "ip", "tenant__slug", "tenant__name")
    date_hierarchy = "created_at"
    show_full_result_count = False
