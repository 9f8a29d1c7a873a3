"""``POST /api/v1/mailboxes/{id}/messages/``: upload a raw RFC 5322 message into a mailbox.

The bytes take the same way as mail received over SMTP: ``ingest.services.accept`` into the
spool, then the drainer, parsing and the events. The answer is 202 with the queue id; the
Message appears once the entry is drained (``ingest.received`` then carries the same id).

An ``Idempotency-Key`` header makes a retried upload safe (ingest/idempotency.py): the same
key and request within IDEMPOTENCY_KEY_TTL answer the first answer again, and queue nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import exceptions, serializers, status
from rest_framework.parsers import BaseParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from audit.middleware import client_ip
from ingest.idempotency import (
    Answer,
    IdempotencyKeyInvalid,
    IdempotencyKeyReused,
    idempotency_key_clean,
    idempotent_answer,
    request_fingerprint,
)
from ingest.services import message_upload
from ingest.spool import is_disk_full
from mailboxes import selectors
from mailboxes.models import Mailbox
from tenants.access import Permission
from tenants.api.views import principal_of


class MessageTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The message is larger than this tenant accepts."
    default_code = "message_too_large"


class SpoolUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The message could not be queued; try again later."
    default_code = "spool_unavailable"


class IdempotencyKeyReusedError(exceptions.APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_detail = "This Idempotency-Key was used for a different request; use a new key for a new request."
    default_code = "idempotency_key_reused"


class IdempotencyKeyInvalidError(exceptions.APIException):
    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "idempotency_key_invalid"


IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    OpenApiTypes.STR,
    location=OpenApiParameter.HEADER,
    required=False,
    description=(
        "Makes retries safe: the same key with the same request within 24 hours answers the first "
        "answer again (same status and body, header `Idempotent-Replayed: true`) and queues nothing; "
        "the same key with a different request answers 422 `idempotency_key_reused`. Keys are scoped "
        "to the API key (or member) that sends them; 1 to 255 printable ASCII characters."
    ),
)


def idempotent_response(
    request: Request, *, principal: Any, fingerprint_parts: tuple[str | bytes, ...], produce: Callable[[], Answer]
) -> Response:
    """The answer of ``produce``, or with an ``Idempotency-Key`` the first answer of the same
    request again (``Idempotent-Replayed: true``); 422 for the key reused on another request,
    400 for a malformed key. ``fingerprint_parts`` name the request (its kind first)."""
    offered = request.headers.get("Idempotency-Key")
    if offered is None:
        answer = produce()
    else:
        try:
            key = idempotency_key_clean(offered)
        except IdempotencyKeyInvalid as exc:
            raise IdempotencyKeyInvalidError(str(exc)) from None
        fingerprint = request_fingerprint(*fingerprint_parts)
        try:
            answer = idempotent_answer(principal=principal, key=key, fingerprint=fingerprint, produce=produce)
        except IdempotencyKeyReused:
            raise IdempotencyKeyReusedError() from None
    response = Response(answer.body, status=answer.status)
    if answer.replayed:
        response["Idempotent-Replayed"] = "true"
    return response


class RawMessageParser(BaseParser):
    """The request body as bytes, read at most up to the size limit plus one byte."""

    media_type = "message/rfc822"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> bytes:  # type: ignore[override]
        limit = settings.INGEST_MAX_MESSAGE_SIZE
        if parser_context is not None:
            limit = parser_context.get("max_size", limit)
        if stream is None:
            return b""
        data = stream.read(limit + 1)
        if len(data) > limit:
            raise MessageTooLarge()
        return bytes(data)


class OctetStreamParser(RawMessageParser):
    media_type = "application/octet-stream"


class MessageUploadView(APIView):
    """Queue a raw message for one mailbox, as if it had arrived over SMTP."""

    parser_classes = [RawMessageParser, OctetStreamParser]
    required_permissions = {"post": Permission.MESSAGES_WRITE}

    def get_parser_context(self, http_request: Any) -> dict[str, Any]:
        context = super().get_parser_context(http_request)
        context["max_size"] = settings.INGEST_MAX_MESSAGE_SIZE
        return context

    @extend_schema(
        operation_id="mailbox_messages_upload",
        request={"message/rfc822": OpenApiTypes.BINARY, "application/octet-stream": OpenApiTypes.BINARY},
        parameters=[
            OpenApiParameter("mail_from", OpenApiTypes.STR, description="Envelope sender to record"),
            IDEMPOTENCY_KEY,
        ],
        responses={
            202: inline_serializer(
                "MessageQueued",
                {
                    "queue_id": serializers.CharField(),
                    "mailbox": serializers.UUIDField(),
                    "status": serializers.CharField(),
                },
            ),
            413: OpenApiResponse(description="Larger than the tenant's maximum message size"),
            422: OpenApiResponse(description="`idempotency_key_reused`: the key was used for another request"),
        },
    )
    def post(self, request: Request, pk: UUID) -> Response:
        principal = principal_of(request)
        try:
            mailbox = selectors.mailbox_get(principal, pk)
        except Mailbox.DoesNotExist:
            raise exceptions.NotFound("No such mailbox.") from None
        if not Mailbox.objects.live().filter(pk=mailbox.pk).exists():
            raise exceptions.NotFound("This mailbox has expired.")
        limit = principal.tenant.max_message_size or settings.INGEST_MAX_MESSAGE_SIZE
        content = request.data
        if not isinstance(content, bytes) or not content.strip():
            raise exceptions.ValidationError({"message": ["Send the raw message as the request body."]})
        if len(content) > limit:
            raise MessageTooLarge()
        mail_from = request.query_params.get("mail_from", "")[:320]

        def upload() -> Answer:
            try:
                queue_id = message_upload(
                    principal=principal,
                    mailbox=mailbox,
                    content=content,
                    mail_from=mail_from,
                    remote_ip=client_ip(request),
                    tls=request.is_secure(),
                )
            except OSError as exc:
                raise SpoolUnavailable("The spool is full; try again later." if is_disk_full(exc) else None) from None
            body = {"queue_id": queue_id, "mailbox": str(mailbox.pk), "status": "queued"}
            return Answer(status=status.HTTP_202_ACCEPTED, body=body)

        return idempotent_response(
            request,
            principal=principal,
            fingerprint_parts=("mailbox-upload", str(mailbox.pk), mail_from, content),
            produce=upload,
        )
