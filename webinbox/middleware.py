"""Security headers for every page, and "sign out everywhere" through a per-user session generation."""

from __future__ import annotations

from collections.abc import Callable

from django.contrib.auth import logout
from django.http import HttpRequest, HttpResponse

# Pages load only our own script and style files: no inline script, no eval, no plugins, and
# no framing by other sites. A view that needs another policy (the sandboxed message body)
# sets its own Content-Security-Policy header, which is then left alone.
DEFAULT_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "frame-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
_ADMIN_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'"
)


class ContentSecurityPolicyMiddleware:
    """A Content-Security-Policy (and Permissions-Policy) on every response that has none."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if "Content-Security-Policy" not in response:
            # The API documentation too: Swagger UI comes from our static files and its
            # init script is a file of its own (mailplatform/urls.py), so no exception.
            policy = _ADMIN_POLICY if request.path.startswith("/admin/") else DEFAULT_POLICY
            response["Content-Security-Policy"] = policy
        response.setdefault("Permissions-Policy", "camera=(), microphone=(), geolocation=(), interest-cohort=()")
        response.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        return response


SESSION_GENERATION_KEY = "_mp_generation"


class SessionGenerationMiddleware:
    """Ends a session whose generation is older than the user's ("sign out everywhere").

    Signing in stores the user's current generation in the session; signing out everywhere
    increments it, so every other session of that user stops working at its next request.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated and not request.path.startswith("/api/"):
            from webinbox.selectors import session_generation_of

            if request.session.get(SESSION_GENERATION_KEY, 0) != session_generation_of(user):
                logout(request)
        return self.get_response(request)
