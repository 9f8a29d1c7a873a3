"""Per-tenant OpenID Connect sign-in (authorization code flow with PKCE), on mozilla-django-oidc.

mozilla-django-oidc reads one provider from settings; here every enterprise tenant brings
its own, so the backend takes its settings from the tenant's SsoProvider. Its token check
is tightened: RS256 only, the signing key from the provider's JWKS, and issuer, audience,
expiry and nonce all verified (OpenID Connect Core 1.0 section 3.1.3.7).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import jwt
import requests
from django.conf import settings
from django.core.exceptions import SuspiciousOperation
from django.urls import reverse
from django.utils import timezone
from mozilla_django_oidc.auth import OIDCAuthenticationBackend

from tenants import crypto
from tenants.models import Membership, SsoProvider, User

logger = logging.getLogger(__name__)

SIGNING_ALGORITHM = "RS256"
DISCOVERY_TTL = timedelta(hours=1)
CLOCK_SKEW = 60  # seconds of leeway on exp/iat/nbf


class SsoError(Exception):
    """Sign-in through the tenant's provider failed; the message is safe to log."""


def callback_url() -> str:
    # Built from BASE_URL, never from the request's Host header.
    return settings.BASE_URL + reverse("tenants:sso-callback")


def discovery(provider: SsoProvider, *, refresh: bool = False) -> dict[str, Any]:
    """The provider's discovery document (OpenID Connect Discovery 1.0), cached for an hour."""
    fresh = provider.discovery_fetched_at and timezone.now() - provider.discovery_fetched_at < DISCOVERY_TTL
    if provider.discovery and fresh and not refresh:
        return dict(provider.discovery)
    url = provider.issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        response = requests.get(url, timeout=settings.SSO_HTTP_TIMEOUT)
        response.raise_for_status()
        document = response.json()
    except (requests.RequestException, ValueError) as exc:
        raise SsoError(f"discovery at {url} failed: {type(exc).__name__}") from exc
    # Section 4.3: the issuer in the document must be exactly the one configured.
    if document.get("issuer") != provider.issuer:
        raise SsoError(f"discovery issuer {document.get('issuer')!r} does not match {provider.issuer!r}")
    for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        if not isinstance(document.get(field), str):
            raise SsoError(f"discovery document lacks {field}")
    SsoProvider.objects.filter(pk=provider.pk).update(discovery=document, discovery_fetched_at=timezone.now())
    provider.discovery, provider.discovery_fetched_at = document, timezone.now()
    return dict(document)


@dataclass(frozen=True)
class AuthorizationRequest:
    url: str
    state: str
    nonce: str
    code_verifier: str


def authorization_request(provider: SsoProvider, *, login_hint: str = "") -> AuthorizationRequest:
    """Where to send the browser, with a fresh state, nonce and PKCE verifier (RFC 7636)."""
    document = discovery(provider)
    state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    query = {
        "response_type": "code",
        "client_id": provider.client_id,
        "redirect_uri": callback_url(),
        "scope": provider.scopes,
        "state": state,
        "nonce": nonce,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    if login_hint:
        query["login_hint"] = login_hint
    return AuthorizationRequest(f"{document['authorization_endpoint']}?{urlencode(query)}", state, nonce, verifier)


class TenantOIDCBackend(OIDCAuthenticationBackend):
    """mozilla-django-oidc's backend, configured from one tenant's SsoProvider."""

    def __init__(self, provider: SsoProvider) -> None:
        self.provider = provider
        self.claims: dict[str, Any] = {}
        self.document = discovery(provider)
        self.client_secret = crypto.decrypt(provider.client_secret_encrypted)
        super().__init__()

    def get_settings(self, attr: str, *args: Any) -> Any:  # type: ignore[override]
        values = {
            "OIDC_OP_TOKEN_ENDPOINT": self.document["token_endpoint"],
            "OIDC_OP_USER_ENDPOINT": self.document.get("userinfo_endpoint"),
            "OIDC_OP_JWKS_ENDPOINT": self.document["jwks_uri"],
            "OIDC_RP_CLIENT_ID": self.provider.client_id,
            "OIDC_RP_CLIENT_SECRET": self.client_secret,
            "OIDC_RP_SIGN_ALGO": SIGNING_ALGORITHM,
            "OIDC_RP_IDP_SIGN_KEY": None,
            "OIDC_RP_SCOPES": self.provider.scopes,
            "OIDC_USE_NONCE": True,
            "OIDC_TIMEOUT": settings.SSO_HTTP_TIMEOUT,
            "OIDC_VERIFY_SSL": True,
            "OIDC_CREATE_USER": True,
            "OIDC_VERIFY_KID": True,
            "OIDC_ALLOW_UNSECURED_JWT": False,
            "OIDC_TOKEN_USE_BASIC_AUTH": False,
            "OIDC_STORE_ACCESS_TOKEN": False,
            "OIDC_STORE_ID_TOKEN": False,
            "OIDC_AUTHENTICATION_CALLBACK_URL": "tenants:sso-callback",
        }
        if attr in values:
            return values[attr]
        if args:
            return args[0]
        raise AttributeError(attr)

    # --- the token exchange and the ID token -------------------------------------------
    def get_token(self, payload: dict[str, Any]) -> dict[str, Any]:
        payload["redirect_uri"] = callback_url()
        return super().get_token(payload)  # type: ignore[no-any-return]

    def _verify_jws(self, payload: str, key: Any) -> dict[str, Any]:
        header = jwt.get_unverified_header(payload)
        if header.get("alg") != SIGNING_ALGORITHM:
            raise SuspiciousOperation(f"ID token algorithm {header.get('alg')!r} is not {SIGNING_ALGORITHM}")
        try:
            return jwt.decode(  # type: ignore[no-any-return]
                payload,
                key,
                algorithms=[SIGNING_ALGORITHM],
                audience=self.provider.client_id,
                issuer=self.provider.issuer,
                leeway=CLOCK_SKEW,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise SuspiciousOperation(f"ID token refused: {type(exc).__name__}") from exc

    def verify_token(self, token: str, **kwargs: Any) -> dict[str, Any]:
        if not kwargs.get("nonce"):
            raise SuspiciousOperation("no nonce to check the ID token against")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise SuspiciousOperation("the ID token is not a JWT") from exc
        # Checked before any key is fetched: an HS256 token must never be "verified" with a
        # public key or the client secret, and the JWKS lookup needs the key id.
        if header.get("alg") != SIGNING_ALGORITHM or not header.get("kid"):
            raise SuspiciousOperation("the ID token must be RS256 with a key id")
        return super().verify_token(token, **kwargs)  # type: ignore[no-any-return]

    def get_userinfo(self, access_token: str, id_token: str, payload: dict[str, Any]) -> dict[str, Any]:
        claims = dict(payload)
        if self.document.get("userinfo_endpoint"):
            userinfo = super().get_userinfo(access_token, id_token, payload)
            # Core section 5.3.2: userinfo must describe the same subject as the ID token.
            if userinfo.get("sub") != payload.get("sub"):
                raise SuspiciousOperation("userinfo describes another subject")
            claims.update(userinfo)
        self.claims = claims
        return claims

    # --- who signs in ------------------------------------------------------------------------
    def verify_claims(self, claims: dict[str, Any]) -> bool:
        email = str(claims.get("email") or "").strip().lower()
        if not email or claims.get("email_verified") is False:
            return False
        return self.provider.domains.filter(name=email.rpartition("@")[2]).exists()  # type: ignore[attr-defined]

    def filter_users_by_claims(self, claims: dict[str, Any]) -> Any:
        return User.objects.filter(email__iexact=str(claims["email"]).strip())

    def create_user(self, claims: dict[str, Any]) -> User:
        from tenants.services import user_get_or_create

        return user_get_or_create(email=str(claims["email"]), name=str(claims.get("name") or ""))

    def update_user(self, user: User, claims: dict[str, Any]) -> User:
        return user

    def role_for(self, claims: dict[str, Any]) -> str:
        """The mapped role: the strongest role any of the user's groups maps to, else the default."""
        order: list[str] = [Membership.Role.VIEWER, Membership.Role.MEMBER, Membership.Role.ADMIN]
        role: str = self.provider.default_role
        if self.provider.role_claim:
            groups = claims.get(self.provider.role_claim) or []
            groups = [groups] if isinstance(groups, str) else list(groups)
            for group in groups:
                mapped = self.provider.role_mapping.get(str(group))
                if mapped in order and order.index(mapped) > order.index(role):
                    role = mapped
        return role

    def authenticate_with_claims(self, request: Any, *, nonce: str, code_verifier: str) -> tuple[User, str]:
        """Run the code exchange; the signed-in user and the role to give them, or SsoError."""
        self.claims = {}
        try:
            user = self.authenticate(request, nonce=nonce, code_verifier=code_verifier)
        except (SuspiciousOperation, requests.RequestException, ValueError, KeyError) as exc:
            raise SsoError(str(exc)[:300] or type(exc).__name__) from exc
        if user is None:
            raise SsoError("the provider's claims do not name an address of this tenant")
        return user, self.role_for(self.claims)
