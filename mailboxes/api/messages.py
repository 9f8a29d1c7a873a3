"""The messages API: list and search, detail, raw and attachment downloads, read/tags, delete.

Waiting (``/messages/wait/``, ``/mailboxes/{id}/codes/latest/``) is asynchronous and lives
in :mod:`mailboxes.api.waiting`.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from mailboxes import antivirus, selectors, services
from mailboxes.api.message_serializers import (
    DownloadSerializer,
    MessageDetailSerializer,
    MessageSummarySerializer,
    MessageUpdateSerializer,
    download_of,
)
from mailboxes.models import Message
from mailboxes.search import QuerySyntaxError
from mailplatform import clamd
from mailplatform.api import StrictSerializer
from mailplatform.pagination import CreatedCursorPagination
from tenants.access import Permission
from tenants.api.views import principal_of


class NewestFirstPagination(CreatedCursorPagination):
    """Newest received first; an opaque cursor, stable while mail arrives."""

    ordering = ("-received_at", "-id")


def _uuid_param(request: Request, name: str) -> UUID | None:
    value = request.query_params.get(name)
    if not value:
        return None
    try:
        return UUID(value)
    except ValueError:
        raise exceptions.ValidationError({name: ["Must be an id."]}) from None


class MessageRescanSerializer(StrictSerializer):
    """A rescan takes no options (an empty body or none)."""


class AntivirusNotConfigured(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "antivirus_not_configured"
    default_detail = "Virus scanning is not configured on this platform (CLAMD_URL)."


class AntivirusUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "antivirus_unavailable"
    default_detail = "The virus scanner is unavailable; try again later."


@extend_schema_view(
    list=extend_schema(
        parameters=[
            OpenApiParameter("mailbox", OpenApiTypes.UUID, description="Only this mailbox"),
            OpenApiParameter(
                "q",
                OpenApiTypes.STR,
                description='Search: words, "phrases", from: to: subject: '
                "has:attachment is:read is:unread tag: before: after: larger: smaller:"
                " auth:spf=|dkim=|dmarc=|arc=<result> (auth:dmarc=fail), - negates",
            ),
            OpenApiParameter("thread", OpenApiTypes.STR, description="Only this conversation"),
        ]
    )
)
class MessageViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet[Message]
):
    """Received messages, newest first."""

    lookup_value_regex = "[0-9a-fA-F-]{32,36}"
    pagination_class = NewestFirstPagination
    required_permissions = {
        "list": Permission.MESSAGES_READ,
        "retrieve": Permission.MESSAGES_READ,
        "raw": Permission.MESSAGES_READ,
        "partial_update": Permission.MESSAGES_WRITE,
        "destroy": Permission.MESSAGES_WRITE,
        "rescan": Permission.MESSAGES_WRITE,
    }

    def get_serializer_class(self) -> Any:
        return MessageSummarySerializer if self.action == "list" else MessageDetailSerializer

    def get_queryset(self) -> Any:
        principal = principal_of(self.request)
        if self.action != "list":
            return selectors.message_scope(principal).prefetch_related("attachments")
        try:
            return selectors.message_list(
                principal,
                mailbox_id=_uuid_param(self.request, "mailbox"),
                query=self.request.query_params.get("q", ""),
                thread_id=self.request.query_params.get("thread") or None,
            )
        except QuerySyntaxError as error:
            raise exceptions.ParseError(f"q: {error}", code="invalid_query") from None

    def get_serializer_context(self) -> dict[str, Any]:
        context = dict(super().get_serializer_context())
        context["remote_images"] = self.request.query_params.get("remote_images") in {"1", "true", "yes"}
        return context

    @extend_schema(request=MessageUpdateSerializer, responses=MessageDetailSerializer)
    def partial_update(self, request: Request, pk: str) -> Response:
        message = self.get_object()
        serializer = MessageUpdateSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        message = services.message_update(principal=principal_of(request), message=message, **serializer.validated_data)
        return Response(MessageDetailSerializer(message, context=self.get_serializer_context()).data)

    def perform_destroy(self, instance: Message) -> None:
        services.message_delete(principal=principal_of(self.request), message=instance)

    @extend_schema(
        request=MessageRescanSerializer,
        responses={200: MessageDetailSerializer, 409: OpenApiResponse(description="antivirus_not_configured")},
    )
    @action(detail=True, methods=["post"])
    def rescan(self, request: Request, pk: str) -> Response:
        """Scan the message for viruses again (clamd), store the verdict and apply the mode.

        Infected: quarantined (quarantine and reject modes) or tagged ``virus`` (tag mode); clean
        lifts the tags ``virus`` and ``unscanned``. 503 ``antivirus_unavailable`` while clamd
        cannot be reached (the verdict becomes ``error``, and the sweeper tries again).
        """
        message = self.get_object()
        MessageRescanSerializer(data=request.data).is_valid(raise_exception=True)
        if not clamd.configured():
            raise AntivirusNotConfigured()
        rescanned = antivirus.message_rescan(message_id=message.pk, principal=principal_of(request))
        if rescanned is None:
            raise exceptions.NotFound()
        if rescanned.antivirus_verdict == "error":
            raise AntivirusUnavailable()
        rescanned = self.get_queryset().get(pk=rescanned.pk)
        return Response(MessageDetailSerializer(rescanned, context=self.get_serializer_context()).data)

    @extend_schema(responses=DownloadSerializer)
    @action(detail=True, methods=["get"])
    def raw(self, request: Request, pk: str) -> Response:
        """A short-lived signed URL for the raw bytes exactly as received (also for quarantined mail)."""
        message = self.get_object()
        download = download_of(
            message.storage_key,
            filename=f"{message.pk}.eml",
            content_type="message/rfc822",
            size=message.size,
            sha256=message.sha256,
        )
        return Response(download)


class AttachmentDownloadView(mixins.RetrieveModelMixin, viewsets.GenericViewSet[Message]):
    """A short-lived signed URL for one attachment of a message."""

    required_permissions = {"retrieve": Permission.MESSAGES_READ}

    @extend_schema(responses=DownloadSerializer)
    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        principal = principal_of(request)
        try:
            message = selectors.message_get(principal, kwargs["pk"])
        except Message.DoesNotExist:
            raise exceptions.NotFound() from None
        attachment = next((a for a in message.attachments.all() if a.pk == kwargs["attachment_id"]), None)
        if attachment is None:
            raise exceptions.NotFound()
        return Response(
            download_of(
                attachment.storage_key,
                filename=attachment.filename,
                content_type=attachment.content_type,
                size=attachment.size,
                sha256=attachment.sha256,
            ),
            status=status.HTTP_200_OK,
        )
