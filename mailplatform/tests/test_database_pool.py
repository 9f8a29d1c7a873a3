"""The web server's PostgreSQL sessions stay within its pool, and a missing database is a 503.

Through a real uvicorn process (mailplatform.asgi) on the test database: the session count
is read from pg_stat_activity while a thousand requests run, and the database is made to
refuse (an exclusive lock holding the pool's only connection, or nothing listening at all).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psycopg
import pytest
from django.db import connection

from mailplatform.testing import ROOT, WebServer, database_url_of, env_with, free_port, start_uvicorn

SESSIONS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    " AND backend_type = 'client backend' AND pid <> pg_backend_pid() AND pid <> ALL(%s)"
)


@pytest.fixture
def web(live_env: dict[str, str]) -> Iterator[Any]:
    started: list[WebServer] = []

    def start(**extra: str) -> WebServer:
        server = start_uvicorn(env={**live_env, "LOG_LEVEL": "ERROR", **extra})
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _own_pids() -> list[int]:
    """This test process's backends (the test's own connection), not the web server's."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return [cursor.fetchone()[0]]


@pytest.mark.slow
def test_it_keeps_the_web_servers_sessions_within_its_pool_under_load(world: Any, web: Any) -> None:
    server = web(DATABASE_POOL_MIN="1", DATABASE_POOL_MAX="4")
    url, key = f"{server.url}/api/v1/mailboxes/", world.owner_key
    own = _own_pids()
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        with psycopg.connect(database_url_of(connection.settings_dict), autocommit=True) as sampler:
            while not done.is_set():
                samples.append(sampler.execute(SESSIONS, [own]).fetchone()[0])  # type: ignore[index]
                time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    local = threading.local()

    def get(_: int) -> int:
        if not hasattr(local, "client"):
            local.client = httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=60)
        return local.client.get(url).status_code

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = Counter(pool.map(get, range(1000)))
    elapsed = time.monotonic() - started
    done.set()
    sampler.join(timeout=10)
    with psycopg.connect(database_url_of(connection.settings_dict), autocommit=True) as after:
        remaining = after.execute(SESSIONS, [own]).fetchone()[0]  # type: ignore[index]

    print(f"1000 requests at concurrency 20 in {elapsed:.1f} s; sessions at most {max(samples)}, after {remaining}")
    assert statuses == {200: 1000}
    assert samples and max(samples) <= 4
    assert remaining <= 4


def _wait_until_blocked(own: list[int], timeout: float = 30.0) -> None:
    """Until one of the web server's sessions waits for a lock (the request holding the pool)."""
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND pid <> ALL(%s)",
                [own],
            )
            if cursor.fetchone()[0]:
                return
            time.sleep(0.05)
    raise AssertionError("no request of the web server waited for the lock")


def _assert_unavailable(answer: httpx.Response, *, api: bool) -> None:
    assert answer.status_code == 503, answer.text[:500]
    assert answer.headers["Retry-After"] == "5"
    if api:
        assert answer.json()["error"]["code"] == "database_unavailable"
    else:
        assert answer.headers["Content-Type"].startswith("text/html")
        assert "Briefly unavailable" in answer.text


@pytest.mark.slow
def test_it_answers_503_with_retry_after_when_the_pool_has_no_free_connection(world: Any, web: Any) -> None:
    server = web(DATABASE_POOL_MIN="1", DATABASE_POOL_MAX="1", DATABASE_POOL_TIMEOUT="1")
    bearer = {"Authorization": f"Bearer {world.owner_key}"}
    mailboxes = f"{server.url}/api/v1/mailboxes/"
    assert httpx.get(mailboxes, headers=bearer, timeout=30).status_code == 200
    own = _own_pids()
    # The one pooled connection is held by a request waiting for this lock.
    with psycopg.connect(database_url_of(connection.settings_dict)) as locker:
        locker.execute("LOCK TABLE tenants_apikey IN ACCESS EXCLUSIVE MODE")
        with ThreadPoolExecutor(max_workers=1) as background:
            held = background.submit(httpx.get, mailboxes, headers=bearer, timeout=60)
            _wait_until_blocked([*own, locker.info.backend_pid])

            _assert_unavailable(httpx.get(mailboxes, headers=bearer, timeout=30), api=True)
            # A long-poll (no middleware of its own) and a page whose session needs the database.
            waiting = f"{server.url}/api/v1/messages/wait/?mailbox={world.mailbox.pk}&timeout=1"
            _assert_unavailable(httpx.get(waiting, headers=bearer, timeout=30), api=True)
            page = httpx.get(f"{server.url}/inbox/", cookies={"sessionid": "x" * 32}, timeout=30)
            _assert_unavailable(page, api=False)
            locker.rollback()
            assert held.result(timeout=60).status_code == 200  # it waited, and then was served


@pytest.mark.slow
def test_it_answers_503_when_the_database_refuses_connections(world: Any, web: Any) -> None:
    refusing = f"postgres://postgres@127.0.0.1:{free_port()}/mailplatform"  # nothing listens there
    server = web(DATABASE_URL=refusing, DATABASE_POOL_TIMEOUT="1")
    bearer = {"Authorization": f"Bearer {world.owner_key}"}  # well-formed: checking it needs the database
    answer = httpx.get(f"{server.url}/api/v1/mailboxes/", headers=bearer, timeout=30)
    _assert_unavailable(answer, api=True)
    _assert_unavailable(httpx.get(f"{server.url}/inbox/", cookies={"sessionid": "x" * 32}, timeout=30), api=False)


_DATABASE_OF = """
import sys
import mailplatform.{module}
from django.db import connection
print(connection.settings_dict["CONN_MAX_AGE"], connection.settings_dict["OPTIONS"].get("pool"))
"""


def _database_of(module: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", _DATABASE_OF.format(module=module)],
        cwd=ROOT,
        env=env_with(LOG_LEVEL="ERROR", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_it_pools_only_the_asgi_servers_postgresql_connections() -> None:
    postgres = {"DATABASE_URL": database_url_of(connection.settings_dict), "DATABASE_POOL_MAX": "7"}
    assert _database_of("asgi", **postgres).startswith("0 {'min_size': 2, 'max_size': 7, 'timeout': 10")
    # Celery workers (and every command) keep their health-checked connections (celery.py).
    assert _database_of("celery", **postgres) == "60 None"
    assert _database_of("asgi", **postgres, DATABASE_POOL="false") == "60 None"


def test_it_never_pools_sqlite(tmp_path: Any) -> None:
    sqlite = {"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", "DATA_DIR": str(tmp_path)}
    assert _database_of("asgi", **sqlite).endswith(" None")
