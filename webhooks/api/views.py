"""The webhooks API: endpoints, their deliveries (the dead-letter view), retry and replay."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from mailplatform.api import no_body_expected
from tenants.access import Permission
from tenants.api.views import principal_of
from webhooks import selectors, services
from webhooks.api.serializers import (
    DeliveryDetailSerializer,
    DeliverySerializer,
    EndpointCreatedSerializer,
    EndpointCreateSerializer,
    EndpointSerializer,
    EndpointUpdateSerializer,
    ReplayResultSerializer,
    ReplaySerializer,
    RotateSecretSerializer,
)
from webhooks.models import Delivery, Endpoint

_MANAGE = Permission.WEBHOOKS_MANAGE
_INVALID_ENDPOINT = OpenApiResponse(
    description="The request is not valid (validation_error, unknown_field...); `unknown_event_type` when an "
    "event type or prefix is not of the event catalogue, each named in `details.event_types`"
)


def _resource_changes(data: dict[str, Any]) -> dict[str, Any]:
    changes = dict(data)
    for outer, inner in (("domains", "domain_ids"), ("mailboxes", "mailbox_ids")):
        if outer in changes:
            changes[inner] = changes.pop(outer)
    return changes


class EndpointViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet[Endpoint]
):
    """Webhook endpoints. The signing secret is returned once, on creation and on rotation."""

    serializer_class = EndpointSerializer
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"
    required_permissions = {
        "list": _MANAGE,
        "retrieve": _MANAGE,
        "create": _MANAGE,
        "partial_update": _MANAGE,
        "destroy": _MANAGE,
        "rotate_secret": _MANAGE,
        "replay": _MANAGE,
    }

    def get_queryset(self) -> Any:
        return selectors.endpoint_list(principal_of(self.request))

    @extend_schema(request=EndpointCreateSerializer, responses={201: EndpointCreatedSerializer, 400: _INVALID_ENDPOINT})
    def create(self, request: Request) -> Response:
        serializer = EndpointCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        endpoint, secret = services.endpoint_create(
            principal=principal_of(request), **_resource_changes(serializer.validated_data)
        )
        output = EndpointCreatedSerializer(endpoint, context={"secret": secret})
        return Response(output.data, status=status.HTTP_201_CREATED)

    @extend_schema(request=EndpointUpdateSerializer, responses={200: EndpointSerializer, 400: _INVALID_ENDPOINT})
    def partial_update(self, request: Request, pk: str) -> Response:
        endpoint = self.get_object()
        serializer = EndpointUpdateSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        endpoint = services.endpoint_update(
            principal=principal_of(request), endpoint=endpoint, **_resource_changes(serializer.validated_data)
        )
        return Response(EndpointSerializer(endpoint).data)

    def perform_destroy(self, instance: Endpoint) -> None:
        services.endpoint_delete(principal=principal_of(self.request), endpoint=instance)

    @extend_schema(request=RotateSecretSerializer, responses=EndpointCreatedSerializer)
    @action(detail=True, methods=["post"], url_path="rotate-secret")
    def rotate_secret(self, request: Request, pk: str) -> Response:
        """Add a new secret; the old one keeps signing for ``overlap_seconds`` (default 24 h)."""
        endpoint = self.get_object()
        serializer = RotateSecretSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        endpoint, secret = services.endpoint_secret_rotate(
            principal=principal_of(request),
            endpoint=endpoint,
            overlap_seconds=serializer.validated_data.get("overlap_seconds"),
        )
        return Response(EndpointCreatedSerializer(endpoint, context={"secret": secret}).data)

    @extend_schema(request=ReplaySerializer, responses={202: ReplayResultSerializer})
    @action(detail=True, methods=["post"])
    def replay(self, request: Request, pk: str) -> Response:
        """Re-enqueue every matching event after ``after`` (event id or cursor) or in ``since``..``until``."""
        endpoint = self.get_object()
        serializer = ReplaySerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        result = services.endpoint_replay(
            principal=principal_of(request), endpoint=endpoint, **serializer.validated_data
        )
        return Response(ReplayResultSerializer(result).data, status=status.HTTP_202_ACCEPTED)


@extend_schema_view(
    list=extend_schema(
        parameters=[
            OpenApiParameter(
                "state", OpenApiTypes.STR, enum=Delivery.State.values, description="dead: the dead-letter view"
            )
        ]
    )
)
class DeliveryViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[Delivery]):
    """An endpoint's deliveries, newest first, with each attempt on the detail."""

    serializer_class = DeliverySerializer
    required_permissions = {"list": _MANAGE, "retrieve": _MANAGE, "retry": _MANAGE}

    def get_serializer_class(self) -> Any:
        return DeliveryDetailSerializer if self.action == "retrieve" else DeliverySerializer

    def _endpoint(self) -> Endpoint:
        return selectors.endpoint_get(principal_of(self.request), self.kwargs["endpoint_id"])

    def get_queryset(self) -> Any:
        state = self.request.query_params.get("state") if self.action == "list" else None
        if state and state not in Delivery.State.values:
            raise exceptions.ValidationError({"state": [f"One of: {', '.join(Delivery.State.values)}."]})
        queryset = selectors.delivery_list(principal_of(self.request), self._endpoint(), state=state)
        if self.action == "retrieve":
            queryset = queryset.prefetch_related("attempt_log")
        return queryset

    @extend_schema(request=None, responses={202: DeliverySerializer})
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, endpoint_id: str, pk: str) -> Response:
        """Send this delivery again now (same ``webhook-id``; the receiver may deduplicate)."""
        no_body_expected(request)
        delivery = services.delivery_retry(principal=principal_of(request), delivery=self.get_object())
        return Response(DeliverySerializer(delivery).data, status=status.HTTP_202_ACCEPTED)
