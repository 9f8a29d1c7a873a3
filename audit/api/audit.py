"""The audit trail API: who did what, from where; filterable, exportable as CSV or JSON."""

from __future__ import annotations

from typing import Any

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, serializers
from rest_framework.generics import ListAPIView
from rest_framework.request import Request
from rest_framework.views import APIView

from audit import selectors
from audit.exports import FIELDS, FORMATS, audit_export_response
from audit.models import AuditEntry
from mailplatform.streams import stream_for

AUDIT_READ = "audit:read"  # tenants.access.Permission.AUDIT_READ; audit cannot import it


class AuditEntrySerializer(serializers.ModelSerializer[AuditEntry]):
    actor = serializers.CharField(source="actor_label")

    class Meta:
        model = AuditEntry
        fields = FIELDS
        read_only_fields = fields


_FILTERS = [
    OpenApiParameter("actor", OpenApiTypes.STR, description="Actor label, user e-mail or API key id"),
    OpenApiParameter("action", OpenApiTypes.STR, description="Exact action or prefix (domain.*)"),
    OpenApiParameter("resource_type", OpenApiTypes.STR),
    OpenApiParameter("resource_id", OpenApiTypes.STR),
    OpenApiParameter("after", OpenApiTypes.DATETIME, description="Only entries after this point: an ISO 8601 time"),
    OpenApiParameter("before", OpenApiTypes.DATETIME, description="Only entries before this point: an ISO 8601 time"),
]


def _filtered(request: Request) -> Any:
    params = request.query_params
    moments = {}
    for name in ("after", "before"):
        if params.get(name):
            try:
                moments[name] = serializers.DateTimeField().to_internal_value(params[name])
            except serializers.ValidationError:
                raise exceptions.ValidationError({name: ["Give an ISO 8601 time."]}) from None
    for name in ("actor", "action", "resource_type", "resource_id"):
        if "\x00" in params.get(name, ""):
            raise exceptions.ValidationError({name: ["Not a valid value."]})
    return selectors.audit_entry_list(
        request.user,  # type: ignore[arg-type]
        actor=params.get("actor") or None,
        action=params.get("action") or None,
        resource_type=params.get("resource_type") or None,
        resource_id=params.get("resource_id") or None,
        **moments,
    )


class AuditEntryListView(ListAPIView[AuditEntry]):
    """The tenant's audit trail, newest first."""

    serializer_class = AuditEntrySerializer
    required_permissions = {"get": AUDIT_READ}

    def get_queryset(self) -> Any:
        return _filtered(self.request)

    @extend_schema(parameters=_FILTERS)
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        return super().get(request, *args, **kwargs)


class AuditExportView(APIView):
    """The same entries as a file: ``format=csv`` (default) or ``format=json``."""

    required_permissions = {"get": AUDIT_READ}

    @extend_schema(
        parameters=[*_FILTERS, OpenApiParameter("format", OpenApiTypes.STR, enum=["csv", "json"])],
        responses={
            (200, "text/csv"): OpenApiTypes.STR,
            (200, "application/json"): AuditEntrySerializer(many=True),
        },
    )
    def get(self, request: Request) -> StreamingHttpResponse:
        kind = request.query_params.get("format", "csv")
        if kind not in FORMATS:
            raise exceptions.ValidationError({"format": ["Use csv or json."]})
        return stream_for(request, audit_export_response(_filtered(request), kind), uses_database=True)
