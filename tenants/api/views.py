from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from mailplatform.api import error_body, no_body_expected
from tenants import selectors, services
from tenants.access import Permission, Principal
from tenants.api.serializers import (
    ApiKeyCreatedSerializer,
    ApiKeyCreateSerializer,
    ApiKeySerializer,
    DomainCreateSerializer,
    DomainSerializer,
    DomainUpdateSerializer,
    DomainVerifySerializer,
    SsoConfigureSerializer,
    SsoProviderSerializer,
    TenantSerializer,
    TenantUpdateSerializer,
)
from tenants.models import ApiKey, Domain


def principal_of(request: Request) -> Principal:
    assert isinstance(request.user, Principal)
    return request.user


class TenantView(APIView):
    """The tenant the key belongs to."""

    required_permissions = {"get": None, "patch": Permission.TENANT_MANAGE}

    @extend_schema(responses=TenantSerializer)
    def get(self, request: Request) -> Response:
        return Response(TenantSerializer(principal_of(request).tenant).data)

    @extend_schema(request=TenantUpdateSerializer, responses=TenantSerializer)
    def patch(self, request: Request) -> Response:
        serializer = TenantUpdateSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        tenant = services.tenant_update(principal=principal_of(request), **serializer.validated_data)
        return Response(TenantSerializer(tenant).data)


class DomainViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet[Domain]
):
    """Mail domains. A new domain is pending until its TXT record is verified."""

    serializer_class = DomainSerializer
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"
    required_permissions = {
        "list": None,
        "retrieve": None,
        "create": Permission.DOMAINS_MANAGE,
        "partial_update": Permission.DOMAINS_MANAGE,
        "destroy": Permission.DOMAINS_MANAGE,
        "verify": Permission.DOMAINS_MANAGE,
    }

    def get_queryset(self) -> Any:
        writable = self.action in {"partial_update", "destroy", "verify"}
        return selectors.domain_list(principal_of(self.request), writable=writable)

    @extend_schema(request=DomainCreateSerializer, responses={201: DomainSerializer})
    def create(self, request: Request) -> Response:
        serializer = DomainCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        domain = services.domain_create(principal=principal_of(request), **serializer.validated_data)
        return Response(DomainSerializer(domain).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=DomainUpdateSerializer, responses=DomainSerializer)
    def partial_update(self, request: Request, pk: str) -> Response:
        domain = self.get_object()
        serializer = DomainUpdateSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        domain = services.domain_update(principal=principal_of(request), domain=domain, **serializer.validated_data)
        return Response(DomainSerializer(domain).data)

    @extend_schema(
        responses={204: None, 400: OpenApiResponse(description="The domain still has mailboxes (domain_not_empty)")}
    )
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().destroy(request, *args, **kwargs)

    def perform_destroy(self, instance: Domain) -> None:
        services.domain_delete(principal=principal_of(self.request), domain=instance)

    @extend_schema(request=None, responses=DomainVerifySerializer)
    @action(detail=True, methods=["post"])
    def verify(self, request: Request, pk: str) -> Response:
        """Check the domain's DNS records now: the TXT record proves ownership, the MX record
        must point at us. Answers the domain with what the check found."""
        domain = self.get_object()
        no_body_expected(request)
        check = services.domain_verify(principal=principal_of(request), domain=domain)
        return Response(DomainVerifySerializer(domain, context={"check": check.as_json()}).data)


class ApiKeyViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[ApiKey]):
    """API keys. The secret is returned once, when the key is created."""

    serializer_class = ApiKeySerializer
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"
    required_permissions = {
        "list": Permission.KEYS_MANAGE,
        "retrieve": Permission.KEYS_MANAGE,
        "create": Permission.KEYS_MANAGE,
        "destroy": Permission.KEYS_MANAGE,
        "revoke": Permission.KEYS_MANAGE,
    }

    def get_queryset(self) -> Any:
        return selectors.api_key_list(principal_of(self.request))

    @extend_schema(request=ApiKeyCreateSerializer, responses={201: ApiKeyCreatedSerializer})
    def create(self, request: Request) -> Response:
        principal = principal_of(request)
        serializer = ApiKeyCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        domains = list(selectors.domain_list(principal).filter(pk__in=data["domains"]))
        mailbox_model = ApiKey._meta.get_field("allowed_mailboxes").related_model
        mailboxes = list(
            principal.scope(mailbox_model._default_manager.all(), domain_field="domain", mailbox_field="pk").filter(
                pk__in=data["mailboxes"]
            )
        )
        pool_model = ApiKey._meta.get_field("allowed_pools").related_model
        pools = list(
            principal.scope(pool_model._default_manager.all(), domain_field="domain", pool_field="pk").filter(
                pk__in=data["pools"]
            )
        )
        if (
            len(domains) != len(set(data["domains"]))
            or len(mailboxes) != len(set(data["mailboxes"]))
            or len(pools) != len(set(data["pools"]))
        ):
            return Response(
                error_body("validation_error", "Unknown domain, mailbox or pool in the allow-list."),
                status=status.HTTP_400_BAD_REQUEST,
            )
        api_key, secret = services.api_key_mint(
            principal=principal,
            name=data["name"],
            permissions=data["permissions"],
            domains=domains,
            mailboxes=mailboxes,
            pools=pools,
            expires_at=data.get("expires_at"),
            ip_allowlist=data["ip_allowlist"],
        )
        output = ApiKeyCreatedSerializer(api_key, context={"secret": secret})
        return Response(output.data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={204: None})
    def destroy(self, request: Request, pk: str) -> Response:
        services.api_key_revoke(principal=principal_of(request), api_key=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=None, responses=ApiKeySerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str) -> Response:
        no_body_expected(request)
        api_key = services.api_key_revoke(principal=principal_of(request), api_key=self.get_object())
        return Response(ApiKeySerializer(api_key).data)


class SsoView(APIView):
    """The tenant's OpenID Connect provider for single sign-on (enterprise plan)."""

    required_permissions = {
        "get": Permission.TENANT_MANAGE,
        "put": Permission.TENANT_MANAGE,
        "delete": Permission.TENANT_MANAGE,
    }

    @extend_schema(
        responses={200: SsoProviderSerializer, 404: OpenApiResponse(description="Single sign-on is not set up")}
    )
    def get(self, request: Request) -> Response:
        provider = selectors.sso_provider_of(principal_of(request))
        if provider is None:
            return Response(error_body("not_found", "Single sign-on is not set up."), status=status.HTTP_404_NOT_FOUND)
        return Response(SsoProviderSerializer(provider).data)

    @extend_schema(request=SsoConfigureSerializer, responses=SsoProviderSerializer)
    def put(self, request: Request) -> Response:
        serializer = SsoConfigureSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        provider = services.sso_provider_configure(principal=principal_of(request), **serializer.validated_data)
        return Response(SsoProviderSerializer(provider).data)

    @extend_schema(request=None, responses={204: None})
    def delete(self, request: Request) -> Response:
        services.sso_provider_delete(principal=principal_of(request))
        return Response(status=status.HTTP_204_NO_CONTENT)
