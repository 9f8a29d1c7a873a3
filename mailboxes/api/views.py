from __future__ import annotations

from typing import Any
from uuid import UUID

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from mailboxes import selectors, services
from mailboxes.api.serializers import MailboxCreateSerializer, MailboxSerializer, MailboxUpdateSerializer
from mailboxes.models import Mailbox
from tenants import selectors as tenant_selectors
from tenants.access import Permission
from tenants.api.views import principal_of


@extend_schema_view(
    list=extend_schema(parameters=[OpenApiParameter("domain", OpenApiTypes.UUID, description="Only this domain")])
)
class MailboxViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet[Mailbox]
):
    """Mailboxes: the addresses mail is received at."""

    serializer_class = MailboxSerializer
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"
    required_permissions = {
        "list": None,
        "retrieve": None,
        "create": Permission.MAILBOXES_MANAGE,
        "partial_update": Permission.MAILBOXES_MANAGE,
        "destroy": Permission.MAILBOXES_MANAGE,
    }

    def get_queryset(self) -> Any:
        domain = self.request.query_params.get("domain")
        domain_id = None
        if domain and self.action == "list":
            try:
                domain_id = UUID(domain)
            except ValueError:
                raise exceptions.ValidationError({"domain": ["Must be a domain id."]}) from None
        return selectors.mailbox_list(principal_of(self.request), domain_id=domain_id)

    @extend_schema(request=MailboxCreateSerializer, responses={201: MailboxSerializer})
    def create(self, request: Request) -> Response:
        principal = principal_of(request)
        serializer = MailboxCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        domains = tenant_selectors.domain_list(principal)
        if "address" in data:
            local_part, _, domain_name = data.pop("address").rpartition("@")
            domain = domains.filter(name=domain_name.lower()).first()
            data["local_part"] = local_part
        else:
            domain = domains.filter(pk=data.pop("domain")).first()
        if domain is None:
            raise exceptions.ValidationError({"domain": ["Not one of your domains."]})
        mailbox = services.mailbox_create(principal=principal, domain=domain, **data)
        return Response(MailboxSerializer(mailbox).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=MailboxUpdateSerializer, responses=MailboxSerializer)
    def partial_update(self, request: Request, pk: str) -> Response:
        mailbox = self.get_object()
        serializer = MailboxUpdateSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        mailbox = services.mailbox_update(principal=principal_of(request), mailbox=mailbox, **serializer.validated_data)
        return Response(MailboxSerializer(mailbox).data)

    def perform_destroy(self, instance: Mailbox) -> None:
        services.mailbox_delete(principal=principal_of(self.request), mailbox=instance)
