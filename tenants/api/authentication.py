"""API authentication: ``Authorization: Bearer mp_...`` and nothing else (no cookies)."""

from __future__ import annotations

from typing import Any

from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request

from audit import context
from audit.middleware import client_ip
from tenants.access import Principal
from tenants.services import KeyRejected, api_key_authenticate


class ApiKeyAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Principal, Any] | None:
        parts = get_authorization_header(request).split()
        if not parts:
            return None
        if len(parts) != 2 or parts[0].lower() != b"bearer":
            raise AuthenticationFailed(
                "Send the key as 'Authorization: Bearer mp_...'.", code="invalid_authorization_header"
            )
        try:
            secret = parts[1].decode("ascii")
        except UnicodeDecodeError:
            raise AuthenticationFailed("The API key is not valid.", code="invalid_api_key") from None
        try:
            api_key = api_key_authenticate(secret=secret, ip=client_ip(request))
        except KeyRejected as rejected:
            raise AuthenticationFailed(str(rejected), code=rejected.code) from None
        context.set_tenant(str(api_key.tenant_id))
        return Principal.for_api_key(api_key), api_key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="mailplatform"'
