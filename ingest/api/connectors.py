"""The connectors API: IMAP accounts pulled into a mailbox (``/api/v1/connectors/``).

CRUD, ``test`` (log in and list the folders, saying which step failed), ``resync`` (take
the newest messages again; duplicates are recognised), ``reconnect`` (after auth_failed),
and ``oauth/initiate`` (the authorization-code flow with PKCE; the provider sends the
person back to ``/connectors/oauth/callback/``). No answer ever carries a secret.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from audit.services import audit_entry_record
from ingest.api.connector_serializers import (
    ConnectorCreateSerializer,
    ConnectorDetailSerializer,
    ConnectorSerializer,
    ConnectorTestSerializer,
    ConnectorUpdateSerializer,
    OAuthInitiatedSerializer,
    OAuthInitiateSerializer,
)
from ingest.imap import oauth, selectors, services
from ingest.models import Connector
from mailplatform.api import no_body_expected
from tenants.access import Permission
from tenants.api.views import principal_of

_MANAGE = Permission.CONNECTORS_MANAGE


class ConnectorViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet[Connector]
):
    """IMAP pull connectors: existing accounts whose new mail flows into a mailbox."""

    serializer_class = ConnectorSerializer
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"
    required_permissions = {
        "list": _MANAGE,
        "retrieve": _MANAGE,
        "create": _MANAGE,
        "partial_update": _MANAGE,
        "destroy": _MANAGE,
        "test": _MANAGE,
        "resync": _MANAGE,
        "reconnect": _MANAGE,
    }

    def get_queryset(self) -> Any:
        queryset = selectors.connector_list(principal_of(self.request))
        if self.action == "retrieve":
            queryset = queryset.prefetch_related("folder_cursors")
        return queryset

    def get_serializer_class(self) -> Any:
        return ConnectorDetailSerializer if self.action == "retrieve" else ConnectorSerializer

    @extend_schema(request=ConnectorCreateSerializer, responses={201: ConnectorSerializer})
    def create(self, request: Request) -> Response:
        serializer = ConnectorCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        connector = services.connector_create(principal=principal_of(request), **serializer.validated_data)
        return Response(ConnectorSerializer(connector).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=ConnectorUpdateSerializer, responses=ConnectorSerializer)
    def partial_update(self, request: Request, pk: str) -> Response:
        connector = self.get_object()
        serializer = ConnectorUpdateSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        connector = services.connector_update(
            principal=principal_of(request), connector=connector, **serializer.validated_data
        )
        return Response(ConnectorSerializer(connector).data)

    def perform_destroy(self, instance: Connector) -> None:
        services.connector_delete(principal=principal_of(self.request), connector=instance)

    @extend_schema(request=None, responses=ConnectorTestSerializer)
    @action(detail=True, methods=["post"])
    def test(self, request: Request, pk: str) -> Response:
        """Connect, log in and list the folders with the stored settings; 200 either way, with
        ``ok`` and the step that failed (``stage``, ``error_kind``, ``error``)."""
        no_body_expected(request)
        result = services.connector_test(principal=principal_of(request), connector=self.get_object())
        return Response(ConnectorTestSerializer(result).data)

    @extend_schema(request=None, responses={202: ConnectorSerializer})
    @action(detail=True, methods=["post"])
    def resync(self, request: Request, pk: str) -> Response:
        """Forget the folder cursors: the newest IMAP_INITIAL_WINDOW messages are looked at
        again; the ones already taken in are skipped (Message-ID, sha256)."""
        no_body_expected(request)
        connector = services.connector_resync(principal=principal_of(request), connector=self.get_object())
        return Response(ConnectorSerializer(connector).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: ConnectorSerializer})
    @action(detail=True, methods=["post"])
    def reconnect(self, request: Request, pk: str) -> Response:
        """Try again now, after ``auth_failed`` or during a backoff."""
        no_body_expected(request)
        connector = services.connector_reconnect(principal=principal_of(request), connector=self.get_object())
        return Response(ConnectorSerializer(connector).data, status=status.HTTP_202_ACCEPTED)


class ConnectorOAuthInitiateView(APIView):
    """Start connecting an OAuth2 account: the URL to send the person to (PKCE, state)."""

    required_permissions = {"post": _MANAGE}

    @extend_schema(request=OAuthInitiateSerializer, responses=OAuthInitiatedSerializer)
    def post(self, request: Request) -> Response:
        serializer = OAuthInitiateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        principal = principal_of(request)
        try:
            connector = selectors.connector_get(principal, serializer.validated_data["connector"])
        except Connector.DoesNotExist:  # like any field naming something outside the scope
            raise exceptions.ValidationError({"connector": ["No such connector."]}) from None
        if connector.auth_type not in services.OAUTH_TYPES:
            raise exceptions.ValidationError({"connector": ["This connector uses password authentication."]})
        try:
            url = oauth.authorization_start(connector)
        except oauth.OAuthError as exc:
            raise DjangoValidationError({"connector": str(exc)}) from None
        audit_entry_record(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action="connector.oauth_initiate",
            resource_type="connector",
            resource_id=connector.pk,
        )
        return Response(
            OAuthInitiatedSerializer(
                {"authorize_url": url, "redirect_uri": oauth.redirect_uri(), "expires_in": oauth.AUTHORIZATION_TTL}
            ).data
        )
