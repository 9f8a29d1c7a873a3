"""Error pages (JSON under /api/, HTML elsewhere) and the favicon."""

from __future__ import annotations

import sys

from django.http import HttpRequest, HttpResponse, HttpResponsePermanentRedirect
from django.templatetags.static import static
from django.views.defaults import page_not_found
from django.views.defaults import server_error as html_server_error

from mailplatform.api import json_error_response
from mailplatform.unavailable import database_unavailable_response, is_database_unavailable


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return json_error_response(request, 404, "not_found", "Not found.")
    return page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    # Django calls this inside its except block: a middleware's query (the session, the
    # user) that found no database is a 503 with Retry-After, not a 500.
    failure = sys.exc_info()[1]
    if is_database_unavailable(failure):
        return database_unavailable_response(request, failure)
    if _is_api(request):
        return json_error_response(request, 500, "server_error", "Something went wrong on our side.")
    return html_server_error(request)


def favicon(request: HttpRequest) -> HttpResponse:
    """/favicon.ico, which browsers ask for whatever the page links: the static SVG icon,
    rather than a 404 logged for every first page view."""
    return HttpResponsePermanentRedirect(static("favicon.svg"))
