"""Per-tenant OpenID Connect sign-in (authorization code flow with PKCE), on mozilla-django-oidc.

mozilla-django-oidc reads one provider from settings; here every enterprise tenant brings
its own, so the backend takes its settings from the tenant's SsoProvider. Its token check
is tightened: RS256 only, the signing key from the provider's JWKS, and issuer, audience,
expiry and nonce all verified (OpenID Connect Core 1.0 section 3.1.3.7).

The provider is a host the tenant names, so every call to it (discovery, token, JWKS,
userinfo) goes through the SSRF-safe transport (mailplatform/transport.py) instead of the
library's own ``requests`` calls, and any failure there reaches the tenant as one code,
``sso_provider_unreachable``, never the fetched document or the exception.

Who may sign in: an address on an e-mail domain the provider claims *and* the tenant has
verified by DNS TXT at the moment of sign-in, never a staff or superuser account.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import jwt
from django.conf import settings
from django.core.exceptions import SuspiciousOperation
from django.urls import reverse
from django.utils import timezone
from mozilla_django_oidc.auth import OIDCAuthenticationBackend

from mailplatform import transport
from tenants import crypto
from tenants.models import Membership, SsoProvider, User

logger = logging.getLogger(__name__)

SIGNING_ALGORITHM = "RS256"
DISCOVERY_TTL = timedelta(hours=1)
CLOCK_SKEW = 60  # seconds of leeway on exp/iat/nbf


# The codes a tenant sees (API errors, the audit log's reason); the details stay in our logs.
UNREACHABLE = "sso_provider_unreachable"
TOKEN_INVALID = "sso_token_invalid"  # noqa: S105 (an error code, not a secret)
CLAIMS_REFUSED = "sso_claims_refused"
DOMAIN_NOT_VERIFIED = "sso_domain_not_verified"
STAFF_REFUSED = "sso_staff_refused"


class SsoError(Exception):
    """Sign-in or set-up through the tenant's provider failed.

    ``code`` is the stable reason the tenant may see; the message is the detail for our own
    logs (it may name a URL or an exception type, so it is never shown to the tenant).
    """

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(detail or code)
        self.code = code


def callback_url() -> str:
    # Built from BASE_URL, never from the request's Host header.
    return settings.BASE_URL + reverse("tenants:sso-callback")


def _call(
    url: str, *, what: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> transport.Response:
    """One call to the provider through the SSRF-safe transport: no redirects, bounded time and size."""
    try:
        response = transport.fetch(
            url,
            policy=transport.Policy.outbound(),
            timeout=settings.SSO_HTTP_TIMEOUT,
            body_limit=settings.SSO_DOCUMENT_LIMIT,
            method=method,
            body=body,
            headers={"Accept": "application/json", **(headers or {})},
        )
    except (transport.UrlRefused, transport.TransportError) as exc:
        raise SsoError(UNREACHABLE, f"{what}: {exc}") from None
    if response.status != 200:
        raise SsoError(UNREACHABLE, f"{what}: HTTP {response.status}")
    return response


def _json_object(response: transport.Response, *, what: str) -> dict[str, Any]:
    try:
        document = json.loads(response.body)
    except ValueError:
        raise SsoError(UNREACHABLE, f"{what}: not JSON") from None
    if not isinstance(document, dict):
        raise SsoError(UNREACHABLE, f"{what}: not a JSON object")
    return document


def discovery(provider: SsoProvider, *, refresh: bool = False) -> dict[str, Any]:
    """The provider's discovery document (OpenID Connect Discovery 1.0), cached for an hour."""
    fresh = provider.discovery_fetched_at and timezone.now() - provider.discovery_fetched_at < DISCOVERY_TTL
    if provider.discovery and fresh and not refresh:
        return dict(provider.discovery)
    url = provider.issuer.rstrip("/") + "/.well-known/openid-configuration"
    document = _json_object(_call(url, what="discovery"), what="discovery")
    # Section 4.3: the issuer in the document must be exactly the one configured.
    if document.get("issuer") != provider.issuer:
        raise SsoError(UNREACHABLE, "discovery: the document names another issuer")
    policy = transport.Policy.outbound()
    for field in ("authorization_endpoint", "token_endpoint", "jwks_uri", "userinfo_endpoint"):
        value = document.get(field)
        if value is None and field == "userinfo_endpoint":
            continue
        if not isinstance(value, str):
            raise SsoError(UNREACHABLE, f"discovery: the document lacks {field}")
        # The browser is sent to the authorization endpoint, we call the others: all of them
        # must be http(s) URLs of the allowed shape (a javascript: or file: URL is refused here).
        try:
            transport.url_parse(value, policy)
        except transport.UrlRefused as exc:
            raise SsoError(UNREACHABLE, f"discovery: {field}: {exc}") from None
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
        self.refusal = ""  # why verify_claims said no (the library only sees False)
        self.matched_user: User | None = None
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

    # --- the provider's endpoints, through the SSRF-safe transport -------------------------
    def get_token(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The token request (RFC 6749 section 4.1.3), client_secret_post."""
        payload["redirect_uri"] = callback_url()
        body = urlencode(payload).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        response = _call(self.document["token_endpoint"], what="token", method="POST", body=body, headers=headers)
        return _json_object(response, what="token")

    def retrieve_matching_jwk(self, token: str) -> Any:
        """The provider's key with the ID token's key id (and algorithm, when the key names one)."""
        jwks = _json_object(_call(self.document["jwks_uri"], what="jwks"), what="jwks")
        header = jwt.get_unverified_header(token)
        keys = jwks.get("keys")
        for jwk in keys if isinstance(keys, list) else []:
            if not isinstance(jwk, dict) or jwk.get("kid") != header.get("kid"):
                continue
            if "alg" in jwk and jwk["alg"] != header.get("alg"):
                continue
            try:
                return jwt.PyJWK(jwk)
            except jwt.PyJWTError as exc:
                raise SuspiciousOperation("the provider's signing key is not usable") from exc
        raise SuspiciousOperation("no key of the provider matches the ID token")

    def _userinfo(self, access_token: str) -> dict[str, Any]:
        response = _call(
            self.document["userinfo_endpoint"], what="userinfo", headers={"Authorization": f"Bearer {access_token}"}
        )
        if response.headers.get("content-type", "").lower().startswith("application/jwt"):
            raise SuspiciousOperation("signed userinfo responses are not supported")
        return _json_object(response, what="userinfo")

    # --- the ID token -----------------------------------------------------------------------

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
            userinfo = self._userinfo(access_token)
            # Core section 5.3.2: userinfo must describe the same subject as the ID token.
            if userinfo.get("sub") != payload.get("sub"):
                raise SuspiciousOperation("userinfo describes another subject")
            claims.update(userinfo)
        self.claims = claims
        return claims

    # --- who signs in ------------------------------------------------------------------------
    def verify_claims(self, claims: dict[str, Any]) -> bool:
        """An address the provider vouches for, on a domain it claims and the tenant has verified
        by DNS now (a claim lapses with the verification), of no staff account."""
        from tenants.selectors import sso_domains_verified

        email = str(claims.get("email") or "").strip().lower()
        if not email or claims.get("email_verified") is False:
            self.refusal = CLAIMS_REFUSED
            return False
        # Whose account the provider named, so a refusal is audited in that person's tenants too.
        self.matched_user = User.objects.filter(email__iexact=email).first()
        domain = email.rpartition("@")[2]
        if not self.provider.domains.filter(name=domain).exists():  # type: ignore[attr-defined]
            self.refusal = CLAIMS_REFUSED
            return False
        if domain not in sso_domains_verified(self.provider.tenant_id, [domain]):
            self.refusal = DOMAIN_NOT_VERIFIED
            return False
        if self.matched_user is not None and not self.matched_user.is_active:
            self.refusal = CLAIMS_REFUSED  # a deactivated account stays out, whoever vouches for it
            return False
        if self.matched_user is not None and (self.matched_user.is_staff or self.matched_user.is_superuser):
            # The platform's own people sign in with their own credentials, never a tenant's.
            self.refusal = STAFF_REFUSED
            return False
        return True

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
        self.claims, self.refusal, self.matched_user = {}, "", None
        try:
            user = self.authenticate(request, nonce=nonce, code_verifier=code_verifier)
        except (SuspiciousOperation, ValueError, KeyError, TypeError) as exc:
            raise SsoError(TOKEN_INVALID, str(exc)[:300] or type(exc).__name__) from exc
        if user is None:
            raise SsoError(self.refusal or CLAIMS_REFUSED, "the provider's claims do not sign in anyone here")
        if user.is_staff or user.is_superuser:
            raise SsoError(STAFF_REFUSED, "a staff account")
        return user, self.role_for(self.claims)
