"""503 with Retry-After, never 500, while the database refuses or the pool has nothing to give.

Overload is not a bug of ours: a client told ``503 database_unavailable`` and when to come
back retries (RFC 9110 section 15.6.4, Retry-After section 10.2.3); a 500 says "give up".
The cases: PostgreSQL refuses the connection (down, restarting, ``max_connections``
reached: SQLSTATE 53300, 57P03), the web process's pool finds no free connection within
DATABASE_POOL_TIMEOUT (psycopg_pool's PoolTimeout), a connection breaks mid-request.
Django wraps all of them as ``OperationalError`` or ``InterfaceError``, but so it wraps many
errors of our own (SQLite's ``near "INSERT": syntax error``, a cursor used once closed): only
the driver's error under it tells them apart (:func:`is_database_unavailable`). Anything else
propagates, to be logged with its traceback and answered 500.

Three places answer it, each for what the others cannot see: the middleware for every view
(DRF hands it exceptions it does not know), the 500 handler for a middleware's own query
(the session, the user), and the long-poll views, which have no middleware.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

import psycopg
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string

logger = logging.getLogger(__name__)

# The classes Django wraps the failures in; is_database_unavailable says which of them are one.
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (OperationalError, InterfaceError)
CODE = "database_unavailable"
MESSAGE = "The service is briefly overloaded or restarting; retry in a few seconds."
RETRY_AFTER = 5  # seconds: about one pool timeout, long enough for a restart to finish

# PostgreSQL's SQLSTATEs of a server that cannot serve now (Appendix A): class 08 (connection
# exception), class 53 (insufficient resources: too many connections, out of memory or disk),
# and 57P01-57P03 (shutting down, crashed, starting: "cannot connect now").
_UNAVAILABLE_SQLSTATE_CLASSES = frozenset({"08", "53"})
_UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})
# SQLite's "another connection holds the lock" (SQLITE_BUSY, SQLITE_LOCKED), past the busy timeout.
_SQLITE_BUSY = ("database is locked", "database table is locked", "database is busy")


def is_database_unavailable(exc: BaseException | None) -> bool:
    """Whether ``exc`` says the database cannot serve for now (retry later), not that a query
    of ours is wrong: refused or lost connections, the pool's timeout, a server out of
    resources or restarting, SQLite's lock held by another connection."""
    if not isinstance(exc, DATABASE_UNAVAILABLE):
        return False
    cause = exc.__cause__ or exc  # Django's wrapper keeps the driver's error as the cause
    if isinstance(cause, psycopg.Error):
        sqlstate = cause.sqlstate
        if sqlstate is None:
            # No answer from a server: the connection failed, broke or is closed, or the
            # pool gave none in time (psycopg_pool's PoolTimeout is an OperationalError).
            return isinstance(cause, psycopg.OperationalError)
        return sqlstate[:2] in _UNAVAILABLE_SQLSTATE_CLASSES or sqlstate in _UNAVAILABLE_SQLSTATES
    if isinstance(cause, sqlite3.OperationalError):
        return str(cause).lower().startswith(_SQLITE_BUSY)
    return False


def database_unavailable_response(request: HttpRequest, exc: BaseException | None = None) -> HttpResponse:
    """The 503: the API's JSON error shape under /api/, a plain page elsewhere."""
    from mailplatform.api import error_body

    # The exception's class only: a connection error's text may carry the host and user.
    logger.warning("database unavailable: %s on %s", type(exc).__name__ if exc else "-", request.path)
    response: HttpResponse
    if request.path.startswith("/api/"):
        response = JsonResponse(error_body(CODE, MESSAGE), status=503)
    else:
        # No request context: the context processors would ask the database for the user.
        response = HttpResponse(render_to_string("503.html"), status=503, content_type="text/html; charset=utf-8")
    response["Retry-After"] = str(RETRY_AFTER)
    response["Cache-Control"] = "no-store"
    return response


class DatabaseUnavailableMiddleware:
    """Turns a view's database-unavailable error into the 503 (process_exception)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if is_database_unavailable(exception):
            return database_unavailable_response(request, exception)
        return None
