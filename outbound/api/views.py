"""The outbound API: send (JSON or raw RFC 5322), what was sent, DKIM keys, suppressions."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from ingest.api.views import IDEMPOTENCY_KEY, RawMessageParser, idempotent_response
from ingest.idempotency import Answer
from mailboxes.selectors import message_scope
from mailplatform.api import BoundedJSONParser, error_body, no_body_expected
from outbound import selectors, services
from outbound.api.serializers import (
    DkimKeyCreateSerializer,
    DkimKeySerializer,
    DkimKeyVerifySerializer,
    DomainSendingSerializer,
    OutboundMessageSerializer,
    SendSerializer,
    SuppressionCreateSerializer,
    SuppressionSerializer,
    outbound_message_body,
)
from outbound.models import DkimKey, OutboundMessage, Suppression
from tenants.access import Permission
from tenants.api.views import principal_of
from tenants.models import Domain

# Only real UUIDs route (anything else is a 404, never a 400 from the database lookup).
_UUID = "[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"


class SendView(APIView):
    """Send a message from a mailbox address of a verified domain.

    JSON (``application/json``) composes the message; a raw RFC 5322 message
    (``message/rfc822``) is sent as it is, to its To, Cc and Bcc (Bcc removed). The answer
    comes once the message is committed to the outbound queue: 202 with its id and each
    recipient's state (``queued``, or ``suppressed``: not sent)."""

    parser_classes = [BoundedJSONParser, RawMessageParser]
    required_permissions = {"post": Permission.MESSAGES_SEND}

    @extend_schema(
        operation_id="messages_send",
        request={"application/json": SendSerializer, "message/rfc822": OpenApiTypes.BINARY},
        parameters=[IDEMPOTENCY_KEY],
        responses={
            202: OutboundMessageSerializer,
            403: OpenApiResponse(description="`domain_not_verified`, `sender_not_allowed`, `missing_permission`"),
            413: OpenApiResponse(description="`message_too_large`"),
            422: OpenApiResponse(description="`idempotency_key_reused`"),
            429: OpenApiResponse(description="`rate_limited` or `quota_exceeded`"),
        },
    )
    def post(self, request: Request) -> Response:
        principal = principal_of(request)
        data = request.data
        if isinstance(data, bytes):
            if not data.strip():
                raise exceptions.ValidationError({"message": ["Send the raw message as the request body."]})
            fingerprint_parts: tuple[str | bytes, ...] = ("raw", data)

            def produce() -> Answer:
                try:
                    content, sender, recipients = services.raw_envelope(data)
                    queued = services.message_queue(
                        principal=principal, content=content, from_address=sender, recipients=recipients
                    )
                except services.SendRefused as refusal:
                    raise _Refused(refusal) from None
                return _accepted(queued)
        else:
            serializer = SendSerializer(data=data)
            serializer.is_valid(raise_exception=True)
            values = dict(serializer.validated_data)
            parent = None
            if values.get("reply_to_message"):
                parent = message_scope(principal).filter(pk=values["reply_to_message"]).first()
                if parent is None:
                    raise exceptions.ValidationError({"reply_to_message": ["No such message."]})
            composition = services.Composition(
                from_address=values["from"],
                to=values["to"],
                cc=values["cc"],
                bcc=values["bcc"],
                reply_to=values["reply_to"],
                subject=values["subject"],
                text=values["text"],
                html=values["html"],
                headers=values["headers"],
                attachments=[
                    services.attachment_decode(item["filename"], item["content"], item["content_type"])
                    for item in values["attachments"]
                ],
                reply_to_message=parent,
            )
            import json

            fingerprint_parts = ("json", json.dumps(data, sort_keys=True, default=str))

            def produce() -> Answer:
                try:
                    return _accepted(services.message_send(principal=principal, composition=composition))
                except services.SendRefused as refusal:
                    raise _Refused(refusal) from None

        return idempotent_response(
            request, principal=principal, fingerprint_parts=("messages-send", *fingerprint_parts), produce=produce
        )


class _Refused(exceptions.APIException):
    def __init__(self, refusal: services.SendRefused) -> None:
        super().__init__(detail=str(refusal), code=refusal.code)
        self.status_code = refusal.status
        self.wait = refusal.retry_after  # DRF's handler answers it as Retry-After


def _accepted(queued: services.Queued) -> Answer:
    """The message and recipients just committed, as they are (no second read)."""
    body = outbound_message_body(queued.message, queued.recipients)
    return Answer(status=status.HTTP_202_ACCEPTED, body=body)


class OutboundMessageViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[OutboundMessage]
):
    """Messages the tenant sent, newest first, with each recipient's delivery state."""

    serializer_class = OutboundMessageSerializer
    lookup_value_regex = _UUID
    required_permissions = {"list": Permission.MESSAGES_READ, "retrieve": Permission.MESSAGES_READ}

    def get_queryset(self) -> Any:
        return selectors.outbound_message_list(principal_of(self.request))


class DkimKeyViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet[DkimKey]
):
    """A domain's DKIM keys: publish ``record_value`` as TXT at ``record_name``, then verify.

    Rotation: create a second key while the first signs; once the new one is verified it
    signs and the old one is retired (keep its record a few days, then delete it)."""

    serializer_class = DkimKeySerializer
    lookup_value_regex = _UUID
    required_permissions = {
        "list": None,
        "retrieve": None,
        "create": Permission.DOMAINS_MANAGE,
        "destroy": Permission.DOMAINS_MANAGE,
        "verify": Permission.DOMAINS_MANAGE,
    }

    def _domain(self) -> Domain:
        writable = self.action in {"create", "destroy", "verify"}
        try:
            return selectors.domain_for_keys(principal_of(self.request), self.kwargs["domain_id"], writable=writable)
        except Domain.DoesNotExist:
            raise exceptions.NotFound() from None

    def get_queryset(self) -> Any:
        return selectors.dkim_key_list(principal_of(self.request), self._domain())

    @extend_schema(request=DkimKeyCreateSerializer, responses={201: DkimKeySerializer})
    def create(self, request: Request, domain_id: UUID) -> Response:
        domain = self._domain()
        serializer = DkimKeyCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key = services.dkim_key_create(principal=principal_of(request), domain=domain, **serializer.validated_data)
        return Response(DkimKeySerializer(key).data, status=status.HTTP_201_CREATED)

    @extend_schema(responses={204: None, 400: OpenApiResponse(description="`dkim_key_active`: rotate first")})
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().destroy(request, *args, **kwargs)

    def perform_destroy(self, instance: DkimKey) -> None:
        services.dkim_key_delete(principal=principal_of(self.request), key=instance)

    @extend_schema(request=None, responses=DkimKeyVerifySerializer)
    @action(detail=True, methods=["post"])
    def verify(self, request: Request, domain_id: UUID, pk: str) -> Response:
        """Look the TXT record up now; a published pending key becomes the one that signs."""
        key = self.get_object()
        no_body_expected(request)
        check = services.dkim_key_verify(principal=principal_of(request), key=key)
        key.refresh_from_db()
        return Response(DkimKeyVerifySerializer(key, context={"check": check.as_json()}).data)


class SuppressionViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet[Suppression]
):
    """Addresses the tenant sends nothing to (hard bounces, complaints, added by hand)."""

    serializer_class = SuppressionSerializer
    lookup_value_regex = _UUID
    required_permissions = {
        "list": Permission.MESSAGES_READ,
        "retrieve": Permission.MESSAGES_READ,
        "create": Permission.MESSAGES_SEND,
        "destroy": Permission.MESSAGES_SEND,
    }

    def get_queryset(self) -> Any:
        return selectors.suppression_list(principal_of(self.request))

    @extend_schema(request=SuppressionCreateSerializer, responses={201: SuppressionSerializer})
    def create(self, request: Request) -> Response:
        principal = principal_of(request)
        serializer = SuppressionCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        if not principal.is_tenant_wide:
            raise exceptions.PermissionDenied("The suppression list is tenant-wide: use a key for the whole tenant.")
        try:
            suppression = services.suppression_add(principal=principal, **serializer.validated_data)
        except DjangoValidationError as exc:
            raise exceptions.ValidationError({"address": exc.messages}) from None
        return Response(SuppressionSerializer(suppression).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: Suppression) -> None:
        services.suppression_remove(principal=principal_of(self.request), suppression=instance)


__all__ = ["error_body"]


class DomainSendingView(APIView):
    """How a domain sends: only as its mailboxes (the default), or as any address of it."""

    required_permissions = {"get": None, "put": Permission.DOMAINS_MANAGE}

    def _domain(self, domain_id: UUID, *, writable: bool) -> Domain:
        try:
            return selectors.domain_for_keys(principal_of(self.request), domain_id, writable=writable)
        except Domain.DoesNotExist:
            raise exceptions.NotFound() from None

    @extend_schema(operation_id="domains_sending_retrieve", responses=DomainSendingSerializer)
    def get(self, request: Request, domain_id: UUID) -> Response:
        domain = self._domain(domain_id, writable=False)
        return Response({"any_local_part": selectors.domain_any_local_part(principal_of(request), domain)})

    @extend_schema(
        operation_id="domains_sending_update", request=DomainSendingSerializer, responses=DomainSendingSerializer
    )
    def put(self, request: Request, domain_id: UUID) -> Response:
        domain = self._domain(domain_id, writable=True)
        serializer = DomainSendingSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        policy = services.domain_sending_set(
            principal=principal_of(request), domain=domain, any_local_part=serializer.validated_data["any_local_part"]
        )
        return Response({"any_local_part": policy.any_local_part})
