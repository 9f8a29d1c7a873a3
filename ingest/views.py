"""Server-rendered pages of the mail path: the OAuth2 callback of IMAP connectors."""

from __future__ import annotations

import logging

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from ingest.imap import oauth

logger = logging.getLogger(__name__)


@never_cache
@require_GET
def connector_oauth_callback(request: HttpRequest) -> HttpResponse:
    """The provider sends the person back here with ``code`` and ``state`` (RFC 6749 4.1.2).

    The state is single-use and names the connector; the code is exchanged for tokens with
    the PKCE verifier kept since ``oauth/initiate``. Neither the code nor a token is logged.
    """
    state = request.GET.get("state", "")[:200]
    code = request.GET.get("code", "")[:4000]
    if request.GET.get("error"):
        return render(
            request, "ingest/oauth_callback.html",
            {"error": f"The provider said: {request.GET.get('error', '')[:100]}."}, status=400,
        )  # fmt: skip
    if not state or not code:
        return render(request, "ingest/oauth_callback.html", {"error": "The answer has no code or state."}, status=400)
    try:
        connector = oauth.authorization_finish(state=state, code=code)
    except oauth.OAuthError as exc:
        logger.info("connector OAuth callback refused: %s", exc)
        return render(request, "ingest/oauth_callback.html", {"error": f"{str(exc).capitalize()}."}, status=400)
    return render(request, "ingest/oauth_callback.html", {"connector": connector})
