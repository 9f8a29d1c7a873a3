"""The web server's PostgreSQL connection pool (Django's, on psycopg_pool).

Under ASGI, Django runs each request's synchronous code in a thread of its own. A connection
kept for reuse (CONN_MAX_AGE) belongs to its thread, so nearly every request opened a new
PostgreSQL session and left the last one idle until it aged out: 49 new sessions for 50
sequential requests, and a modest load used up ``max_connections`` (then every request
failed). With the pool, a request borrows a connection and gives it back when it finishes
(CONN_MAX_AGE 0); a process never holds more than DATABASE_POOL_MAX sessions (plus the
long-poll waiters' one LISTEN connection, mailboxes/waiting.py), and a request that finds
none free within DATABASE_POOL_TIMEOUT seconds answers 503 (mailplatform/unavailable.py).

Only the ASGI server: asgi.py calls :func:`web_pool_enable` before Django sets up. A WSGI
server (wsgi.py, the test suite's live server) serves a request per thread for the thread's
life, where CONN_MAX_AGE reuse works as meant. Celery workers (prefork: one task at a time
per process) keep one connection each across tasks, recycled by CONN_MAX_AGE and
health-checked (mailplatform/celery.py); a pool there would only add idle sessions and a
thread per process. SQLite is never pooled.
"""

from __future__ import annotations

from typing import Any, cast

from django.conf import settings


def pool_options() -> dict[str, Any]:
    """psycopg_pool.ConnectionPool's arguments from DATABASE_POOL_MIN/MAX/TIMEOUT."""
    return {
        "min_size": settings.DATABASE_POOL_MIN,
        "max_size": settings.DATABASE_POOL_MAX,
        "timeout": settings.DATABASE_POOL_TIMEOUT,
        "name": "web",  # in psycopg_pool's log lines and its worker threads' names
    }


def web_pool_enable() -> bool:
    """Pool this process's PostgreSQL connections (unless DATABASE_POOL=false); True if on.

    Changes the default database's settings in place, before any connection exists: the
    connection handler and its wrappers share these dictionaries.
    """
    database = settings.DATABASES["default"]
    if not settings.DATABASE_POOL or database["ENGINE"] == "django.db.backends.sqlite3":
        return False
    database["CONN_MAX_AGE"] = 0  # Django refuses a pool with persistent connections
    options = cast(dict[str, Any], database.setdefault("OPTIONS", {}))
    options["pool"] = pool_options()
    return True


def is_pooled(alias: str = "default") -> bool:
    from django.db import connections

    return bool(connections[alias].settings_dict.get("OPTIONS", {}).get("pool"))
