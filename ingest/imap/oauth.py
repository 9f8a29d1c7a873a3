"""OAuth2 for connectors: provider presets and access tokens refreshed before they expire.

Token requests go through the SSRF-safe transport (``mailplatform.transport``, the
``OUTBOUND_*`` policy) like every call to a host a tenant names. A refresh answered with
``invalid_grant`` (RFC 6749 section 5.2: the refresh token was revoked or expired) is final
(:class:`OAuthRevoked`, the connector goes to ``auth_failed``); anything else is transient.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from urllib.parse import urlencode

from django.utils import timezone

from ingest.models import Connector
from mailplatform import transport
from tenants import crypto

PRESETS: dict[str, dict[str, str]] = {
    "google": {
        "authorize_url": "https://accounts.google.com/o/oauth2/v2/auth",
        "token_url": "https://oauth2.googleapis.com/token",
        "scope": "https://mail.google.com/",
        "host": "imap.gmail.com",
    },
    "microsoft": {
        "authorize_url": "https://login.microsoftonline.com/common/oauth2/v2.0/authorize",
        "token_url": "https://login.microsoftonline.com/common/oauth2/v2.0/token",
        "scope": "https://outlook.office.com/IMAP.AccessAsUser.All offline_access",
        "host": "outlook.office365.com",
    },
}
REFRESH_MARGIN = timedelta(minutes=5)  # refresh this long before the access token expires
TOKEN_TIMEOUT = 15.0
TOKEN_BODY_LIMIT = 64 * 1024


class OAuthError(Exception):
    kind = "oauth"


class OAuthRevoked(OAuthError):
    """The refresh token no longer works: a person must reconnect the account."""

    kind = "auth_failed"


def provider_apply(connector: Connector) -> None:
    """Fill the authorize/token URLs and scope of a preset the connector names (kept if set)."""
    preset = PRESETS.get(connector.oauth_provider or "")
    if preset is None:
        return
    connector.oauth_authorize_url = connector.oauth_authorize_url or preset["authorize_url"]
    connector.oauth_token_url = connector.oauth_token_url or preset["token_url"]
    connector.oauth_scope = connector.oauth_scope or preset["scope"]


def token_request(connector: Connector, form: dict[str, str]) -> dict[str, object]:
    """POST a form to the connector's token endpoint; the JSON answer or an OAuthError."""
    secret = crypto.decrypt(connector.oauth_client_secret_encrypted) if connector.oauth_client_secret_encrypted else ""
    body = {**form, "client_id": connector.oauth_client_id}
    if secret:
        body["client_secret"] = secret
    try:
        response = transport.fetch(
            connector.oauth_token_url,
            policy=transport.Policy.outbound(),
            timeout=TOKEN_TIMEOUT,
            body_limit=TOKEN_BODY_LIMIT,
            method="POST",
            body=urlencode(body).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
        )
    except (transport.UrlRefused, transport.TransportError) as exc:
        raise OAuthError(f"token endpoint unreachable: {exc}"[:300]) from None
    try:
        answer = json.loads(response.body or b"{}")
    except ValueError:
        answer = {}
    if not isinstance(answer, dict):
        answer = {}
    if response.status >= 400 or "access_token" not in answer:
        error = str(answer.get("error") or f"HTTP {response.status}")
        if error in {"invalid_grant", "unauthorized_client", "invalid_client"}:
            raise OAuthRevoked(f"the provider refused the refresh token ({error})")
        raise OAuthError(f"token refresh failed ({error})")
    return answer


def access_token_fresh(connector: Connector) -> tuple[str, datetime | None, str | None] | None:
    """The stored access token while valid (None when it must be refreshed)."""
    expires = connector.oauth_access_token_expires_at
    if connector.oauth_access_token_encrypted and (expires is None or expires - REFRESH_MARGIN > timezone.now()):
        return crypto.decrypt(connector.oauth_access_token_encrypted), expires, None
    return None


def access_token_refresh(connector: Connector) -> tuple[str, datetime | None, str | None]:
    """Refresh: (access token, its expiry, a rotated refresh token or None)."""
    if not connector.oauth_refresh_token_encrypted:
        raise OAuthRevoked("no refresh token: connect the account first")
    answer = token_request(
        connector,
        {"grant_type": "refresh_token", "refresh_token": crypto.decrypt(connector.oauth_refresh_token_encrypted)},
    )
    expires_in = answer.get("expires_in")
    expires = timezone.now() + timedelta(seconds=int(str(expires_in))) if str(expires_in or "").isdigit() else None
    rotated = answer.get("refresh_token")
    return str(answer["access_token"]), expires, str(rotated) if rotated else None


# --- Authorization-code flow with PKCE (RFC 6749 section 4.1, RFC 7636) --------------------
AUTHORIZATION_TTL = 600  # seconds a started authorization may be finished in
_STATE_PREFIX = "connector-oauth:"


def redirect_uri() -> str:
    from django.conf import settings

    return f"{settings.BASE_URL.rstrip('/')}/connectors/oauth/callback/"


def authorization_start(connector: Connector) -> str:
    """The provider's authorize URL for this connector; state and verifier kept 10 minutes."""
    import base64
    import hashlib
    import secrets

    from django.core.cache import cache

    if not connector.oauth_authorize_url or not connector.oauth_client_id:
        raise OAuthError("the connector has no authorize URL or client id")
    state = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    cache.set(
        _STATE_PREFIX + hashlib.sha256(state.encode()).hexdigest(),
        {"connector": str(connector.pk), "verifier": verifier},
        AUTHORIZATION_TTL,
    )
    query = {
        "response_type": "code",
        "client_id": connector.oauth_client_id,
        "redirect_uri": redirect_uri(),
        "scope": connector.oauth_scope,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "access_type": "offline",  # Google: a refresh token
        "prompt": "consent",
    }
    separator = "&" if "?" in connector.oauth_authorize_url else "?"
    return connector.oauth_authorize_url + separator + urlencode(query)


def authorization_finish(*, state: str, code: str) -> Connector:
    """Exchange the code (single-use state) for tokens and keep them encrypted."""
    import hashlib

    from django.core.cache import cache
    from django.db.models import F

    key = _STATE_PREFIX + hashlib.sha256(state.encode()).hexdigest()
    pending = cache.get(key)
    cache.delete(key)
    if not pending:
        raise OAuthError("this authorization expired or was already used; start again")
    connector = Connector.objects.filter(pk=pending["connector"]).first()
    if connector is None:
        raise OAuthError("the connector was deleted")
    answer = token_request(
        connector,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri(),
            "code_verifier": pending["verifier"],
        },
    )
    if not answer.get("refresh_token"):
        raise OAuthError("the provider gave no refresh token (offline access was not granted)")
    expires_in = answer.get("expires_in")
    Connector.objects.filter(pk=connector.pk).update(
        oauth_refresh_token_encrypted=crypto.encrypt(str(answer["refresh_token"])),
        oauth_access_token_encrypted=crypto.encrypt(str(answer["access_token"])),
        oauth_access_token_expires_at=(
            timezone.now() + timedelta(seconds=int(str(expires_in))) if str(expires_in or "").isdigit() else None
        ),
        state=Connector.State.CONNECTING if connector.active else Connector.State.DISABLED,
        generation=F("generation") + 1,
        updated_at=timezone.now(),
    )
    connector.refresh_from_db()
    return connector
