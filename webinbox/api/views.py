"""POST /api/v1/temp-inboxes/: a temporary inbox for scripts (no key; rate-limited per IP)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import exceptions, serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from mailplatform.api import no_body_expected
from webinbox import services


class TempInboxCreateView(APIView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    required_permissions: dict[str, Any] = {"post": None}

    @extend_schema(
        summary="Create a temporary inbox",
        description=(
            "**Permission:** none, no key needed. At most TEMP_INBOX_RATE_PER_HOUR per client IP "
            "(429 `rate_limited` beyond, with Retry-After). The token in the answer is the inbox's only credential "
            "and is never shown again: open "
            "`inbox_url` in a browser, or keep the token to come back."
        ),
        request=None,
        responses={
            201: inline_serializer(
                "TempInbox",
                {
                    "address": serializers.EmailField(),
                    "inbox_url": serializers.URLField(),
                    "token": serializers.CharField(),
                    "expires_at": serializers.DateTimeField(),
                },
            ),
            403: OpenApiResponse(description="The temporary inboxes' tenant is suspended (tenant_suspended)"),
            429: OpenApiResponse(
                description="More than TEMP_INBOX_RATE_PER_HOUR from this address (rate_limited; Retry-After)"
            ),
        },
        auth=[],
    )
    def post(self, request: Request) -> Response:
        no_body_expected(request)
        try:
            temp_inbox, token = services.temp_inbox_create(ip=services.client_ip())
        except services.RateLimited as limited:
            raise exceptions.Throttled(wait=limited.retry_after) from None
        mailbox = temp_inbox.mailbox
        body = {
            "address": mailbox.address,
            "inbox_url": f"{settings.BASE_URL}/t/{token}/",
            "token": token,
            "expires_at": mailbox.expires_at,
        }
        response = Response(body, status=status.HTTP_201_CREATED)
        response["Cache-Control"] = "no-store"
        return response
