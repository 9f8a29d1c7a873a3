"""Only a database that cannot serve for now is a 503; an error of ours is a 500 with its traceback.

Django wraps both in ``OperationalError``: a refused connection or a lock held elsewhere (retry
later) and a query SQLite cannot parse (retrying never helps). The errors here are real ones,
from a SQLite file and from PostgreSQL, raised in views served through the whole middleware
stack and the 500 handler.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import OperationalError, connection, connections, transaction
from django.db.utils import ConnectionHandler
from django.http import HttpRequest, HttpResponse
from django.test import Client
from django.urls import include, path

from mailplatform.testing import free_port
from mailplatform.unavailable import is_database_unavailable

pytestmark = pytest.mark.urls(__name__)
handler500 = "mailplatform.views.server_error"
SQLITE_FILE: dict[str, Path] = {}


def _sqlite(**options: Any) -> Any:
    """A Django connection to the test's SQLite file (the embedded default's engine)."""
    handler = ConnectionHandler(
        {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(SQLITE_FILE["path"]), "OPTIONS": options}}
    )
    return handler["default"]


def _syntax_error(request: HttpRequest) -> HttpResponse:
    with _sqlite().cursor() as cursor:
        cursor.execute("INSERT INSERT")  # near "INSERT": syntax error
    return HttpResponse("unreachable")


def _locked(request: HttpRequest) -> HttpResponse:
    with _sqlite(timeout=0).cursor() as cursor:
        cursor.execute("INSERT INTO note VALUES (1)")  # another connection holds the lock
    return HttpResponse("unreachable")


urlpatterns = [
    path("api/v1/trial/syntax/", _syntax_error),
    path("trial/syntax/", _syntax_error),
    path("api/v1/trial/locked/", _locked),
    path("", include("mailplatform.urls")),  # the project's own views, imported in its order
]


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Iterator[Path]:
    SQLITE_FILE["path"] = tmp_path / "trial.sqlite3"
    with sqlite3.connect(SQLITE_FILE["path"]) as setup:
        setup.execute("CREATE TABLE note (id integer)")
    yield SQLITE_FILE["path"]
    SQLITE_FILE.clear()


@pytest.fixture
def server_errors() -> Iterator[list[logging.LogRecord]]:
    """What django.request logs (whatever LOGGING says about propagation)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep, logger = Keep(level=logging.ERROR), logging.getLogger("django.request")
    logger.addHandler(keep)
    yield records
    logger.removeHandler(keep)


def test_it_answers_a_programming_error_with_a_500_and_logs_its_traceback(
    db: Any, sqlite_file: Path, server_errors: list[logging.LogRecord]
) -> None:
    answer = Client(raise_request_exception=False).get("/api/v1/trial/syntax/")
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "server_error"
    assert "Retry-After" not in answer
    [record] = server_errors
    assert record.exc_info is not None and 'near "INSERT": syntax error' in str(record.exc_info[1])
    page = Client(raise_request_exception=False).get("/trial/syntax/")
    assert page.status_code == 500 and page["Content-Type"].startswith("text/html")


def test_it_answers_a_locked_sqlite_database_with_a_503(db: Any, sqlite_file: Path) -> None:
    holder = sqlite3.connect(sqlite_file, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        answer = Client(raise_request_exception=False).get("/api/v1/trial/locked/")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert answer.status_code == 503
    assert answer["Retry-After"] == "5"
    assert answer.json()["error"]["code"] == "database_unavailable"


def _raised(action: Any) -> BaseException:
    with pytest.raises(OperationalError) as raised:
        action()
    return raised.value


def test_it_tells_postgresqls_refusal_from_a_query_that_failed(db: Any) -> None:
    refusing = type(connections["default"])({**connection.settings_dict, "PORT": free_port()}, alias="refusing")
    assert is_database_unavailable(_raised(refusing.ensure_connection))

    def run_past_the_statement_timeout() -> None:  # SQLSTATE 57014: an OperationalError, not an outage
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL statement_timeout = '10ms'")
            cursor.execute("SELECT pg_sleep(1)")

    assert not is_database_unavailable(_raised(run_past_the_statement_timeout))
