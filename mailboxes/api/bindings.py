"""The pools, bindings, links and providers API (the code proxy is in mailboxes.api.binding_codes)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from mailboxes import selectors as mailbox_selectors
from mailboxes.api.binding_serializers import (
    BindingSerializer,
    LinkOrCreateResultSerializer,
    LinkOrCreateSerializer,
    PoolCreateSerializer,
    PoolSerializer,
    PoolUpdateSerializer,
    ProviderCreateSerializer,
    ProviderSerializer,
    ProviderUpdateSerializer,
    ReassignSerializer,
    binding_representation,
    link_or_create_plain,
)
from mailboxes.bindings import selectors, services
from mailboxes.bindings.attribution import provider_name_normalize
from mailboxes.models import AccountBinding, AccountProvider, MailboxPool
from mailplatform.api import no_body_expected
from mailplatform.pagination import CreatedCursorPagination
from tenants import selectors as tenant_selectors
from tenants.access import Permission
from tenants.api.views import principal_of

_CONFLICT = OpenApiResponse(description="The current state refuses it (pool_exhausted, account_bound...)")


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "Conflict."
    default_code = "conflict"


def _conflict(error: services.BindingConflict) -> Conflict:
    return Conflict(detail=error.message, code=error.code)


def _uuid_query(request: Request, name: str) -> UUID | None:
    value = request.query_params.get(name)
    if not value:
        return None
    try:
        return UUID(value)
    except ValueError:
        raise exceptions.ValidationError({name: ["Must be an id."]}) from None


class PoolViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[MailboxPool]):
    """Mailbox pools: mailboxes of one domain handed out to your application's accounts, with
    live metrics (mailboxes bound and free, bindings per mailbox, accounts per provider, codes
    served and messages received in the last 24 hours)."""

    serializer_class = PoolSerializer
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"
    pagination_class = CreatedCursorPagination
    required_permissions = {
        "list": Permission.BINDINGS_MANAGE,
        "retrieve": Permission.BINDINGS_MANAGE,
        "create": Permission.BINDINGS_MANAGE,
        "partial_update": Permission.BINDINGS_MANAGE,
    }

    def get_queryset(self) -> Any:
        return selectors.pool_list(principal_of(self.request))

    @extend_schema(request=PoolCreateSerializer, responses={201: PoolSerializer})
    def create(self, request: Request) -> Response:
        principal = principal_of(request)
        serializer = PoolCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        domain = tenant_selectors.domain_list(principal).filter(pk=data.pop("domain")).first()
        if domain is None:
            raise exceptions.ValidationError({"domain": ["Not one of your domains."]})
        wanted = set(data.pop("mailboxes"))
        mailboxes = list(mailbox_selectors.mailbox_list(principal).filter(pk__in=wanted))
        if len(mailboxes) != len(wanted):
            raise exceptions.ValidationError({"mailboxes": ["Unknown mailbox."]})
        pool = services.pool_create(principal=principal, domain=domain, mailboxes=mailboxes, **data)
        return Response(PoolSerializer(pool).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=PoolUpdateSerializer, responses=PoolSerializer)
    def partial_update(self, request: Request, pk: str) -> Response:
        pool = self.get_object()
        serializer = PoolUpdateSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        pool = services.pool_update(principal=principal_of(request), pool=pool, **serializer.validated_data)
        return Response(PoolSerializer(pool).data)


def _bool_query(request: Request, name: str) -> bool | None:
    value = request.query_params.get(name)
    if value in (None, ""):
        return None
    if value.lower() in {"1", "true", "yes"}:
        return True
    if value.lower() in {"0", "false", "no"}:
        return False
    raise exceptions.ValidationError({name: ["Must be true or false."]})


@extend_schema_view(
    list=extend_schema(
        parameters=[
            OpenApiParameter("account_ref", OpenApiTypes.STR, description="Only this account"),
            OpenApiParameter("provider", OpenApiTypes.STR, description="Only this provider"),
            OpenApiParameter("mailbox", OpenApiTypes.UUID, description="Only this mailbox"),
            OpenApiParameter("pool", OpenApiTypes.UUID, description="Only this pool"),
            OpenApiParameter("active", OpenApiTypes.BOOL, description="Only active (true) or ended (false) ones"),
        ]
    )
)
class BindingViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[AccountBinding]):
    """Account bindings: which mailbox serves which of your accounts, with their history."""

    serializer_class = BindingSerializer
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"
    pagination_class = CreatedCursorPagination
    required_permissions = {
        "list": Permission.BINDINGS_MANAGE,
        "retrieve": Permission.BINDINGS_MANAGE,
        "reassign": Permission.BINDINGS_MANAGE,
        "release": Permission.BINDINGS_MANAGE,
    }

    def get_queryset(self) -> Any:
        principal = principal_of(self.request)
        if self.action != "list":
            return selectors.binding_scope(principal)
        params = self.request.query_params
        return selectors.binding_list(
            principal,
            account_ref=params.get("account_ref") or None,
            provider=params.get("provider") or None,
            mailbox_id=_uuid_query(self.request, "mailbox"),
            pool_id=_uuid_query(self.request, "pool"),
            active=_bool_query(self.request, "active"),
        )

    @extend_schema(request=ReassignSerializer, responses={200: BindingSerializer, 409: _CONFLICT})
    @action(detail=True, methods=["post"])
    def reassign(self, request: Request, pk: str) -> Response:
        """Move the account to another mailbox (``mailbox``), or to one allocated from ``pool``
        (default: its own pool). The link stays the same; codes count from now. Answers the new
        binding; the old one stays as history (``successor`` points at the new one)."""
        binding = self.get_object()
        principal = principal_of(request)
        serializer = ReassignSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        mailbox = pool = None
        if "mailbox" in data:
            mailbox = selectors.mailbox_in_pool(principal, data["mailbox"])
            if mailbox is None:
                raise exceptions.ValidationError({"mailbox": ["Not a mailbox of one of your pools."]})
        if "pool" in data:
            pool = selectors.pool_list(principal).filter(pk=data["pool"]).first()
            if pool is None:
                raise exceptions.ValidationError({"pool": ["Not one of your pools."]})
        try:
            moved = services.binding_reassign(principal=principal, binding=binding, mailbox=mailbox, pool=pool)
        except services.BindingConflict as error:
            raise _conflict(error) from None
        return Response(BindingSerializer(moved).data)

    @extend_schema(request=None, responses={200: BindingSerializer, 409: _CONFLICT})
    @action(detail=True, methods=["post"])
    def release(self, request: Request, pk: str) -> Response:
        """End the binding: its link answers 404 from now on, its mailbox's place is free."""
        binding = self.get_object()
        no_body_expected(request)
        try:
            released = services.binding_release(principal=principal_of(request), binding=binding)
        except services.BindingConflict as error:
            raise _conflict(error) from None
        return Response(BindingSerializer(released).data)


class LinkOrCreateView(APIView):
    """The account's active binding, or a new one on a mailbox the pool's policy allocates.

    Idempotent: concurrent calls for one account create one binding (201 for the call that
    created it, with the ``link``; 200 with the existing binding and no link for the others).
    409 ``pool_exhausted`` when no mailbox can take the account, ``account_bound`` when the
    account is bound for another provider."""

    required_permissions = {"post": Permission.BINDINGS_MANAGE}

    @extend_schema(
        request=LinkOrCreateSerializer,
        responses={200: LinkOrCreateResultSerializer, 201: LinkOrCreateResultSerializer, 409: _CONFLICT},
    )
    def post(self, request: Request) -> Response:
        principal = principal_of(request)
        data = link_or_create_plain(request.data)
        if data is None:
            serializer = LinkOrCreateSerializer(data=request.data)
            serializer.is_valid(raise_exception=True)
            data = dict(serializer.validated_data)
        # The common case first, in one query: the account is bound in this pool already. When
        # it is not, the service does not look again (a binding elsewhere is still found).
        existing = selectors.binding_one(
            selectors.binding_scope(principal).filter(
                pool_id=data["pool"], account_ref=data["account_ref"].strip(), active=True
            )
        )
        if existing is not None and existing.provider == provider_name_normalize(data["provider"]):
            return Response(binding_representation(existing, created=False, link=None))
        pool = selectors.pool_list(principal).filter(pk=data.pop("pool")).first()
        if pool is None:
            raise exceptions.ValidationError({"pool": ["Not one of your pools."]})
        try:
            result = services.binding_link_or_create(principal=principal, pool=pool, looked_up=True, **data)
        except services.BindingConflict as error:
            raise _conflict(error) from None
        output = binding_representation(result.binding, created=result.created, link=result.link)
        return Response(output, status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK)


class LinkDetailView(APIView):
    """Resolve a link to its account, mailbox address and state. A released or unknown link
    answers 404 alike."""

    required_permissions = {"get": Permission.BINDINGS_MANAGE}

    @extend_schema(responses=BindingSerializer)
    def get(self, request: Request, link: str) -> Response:
        binding = selectors.binding_by_link(principal_of(request), link)
        if binding is None:
            raise exceptions.NotFound()
        return Response(BindingSerializer(binding).data)


class ProviderViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet[AccountProvider],
):
    """Providers and the rules that attribute their verification mail (sender domains,
    subject patterns), so a code in a shared mailbox reaches the right account."""

    serializer_class = ProviderSerializer
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"
    pagination_class = CreatedCursorPagination
    required_permissions = {
        "list": Permission.BINDINGS_MANAGE,
        "retrieve": Permission.BINDINGS_MANAGE,
        "create": Permission.BINDINGS_MANAGE,
        "partial_update": Permission.BINDINGS_MANAGE,
        "destroy": Permission.BINDINGS_MANAGE,
    }

    def get_queryset(self) -> Any:
        return selectors.provider_list(principal_of(self.request))

    @extend_schema(request=ProviderCreateSerializer, responses={201: ProviderSerializer})
    def create(self, request: Request) -> Response:
        principal = principal_of(request)
        serializer = ProviderCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if selectors.provider_list(principal).filter(name=data["name"].lower()).exists():
            raise exceptions.ValidationError({"name": ["This provider exists; change it with PATCH."]})
        provider = services.provider_save(principal=principal, **data)
        return Response(ProviderSerializer(provider).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=ProviderUpdateSerializer, responses=ProviderSerializer)
    def partial_update(self, request: Request, pk: str) -> Response:
        provider = self.get_object()
        serializer = ProviderUpdateSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        provider = services.provider_save(
            principal=principal_of(request), name=provider.name, **serializer.validated_data
        )
        return Response(ProviderSerializer(provider).data)

    def perform_destroy(self, instance: AccountProvider) -> None:
        services.provider_delete(principal=principal_of(self.request), provider=instance)
