"""The end-to-end mail path with every process's DATABASE_URL pointing at pgbouncer in
transaction mode (docs/scaling.md): runsmtp's drainer, the Celery worker and uvicorn all
reach PostgreSQL through it, and only the waiters' LISTEN connection goes straight to the
server (DATABASE_SESSION_URL), because LISTEN holds a session.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from mailplatform.testing import Pgbouncer, database_url_of, env_with
from tests.test_mail_path import (
    test_it_answers_waiters_within_a_second_of_indexing_mail_sent_over_smtp as mail_path_test,
)

pytestmark = [pytest.mark.slow]


@pytest.fixture
def pgbouncer(transactional_db: Any, tmp_path: Any) -> Iterator[Pgbouncer]:
    from django.db import connection

    settings_dict = connection.settings_dict
    bouncer = Pgbouncer(
        upstream_host=settings_dict.get("HOST") or "127.0.0.1",
        upstream_port=int(settings_dict.get("PORT") or 5432),
        folder=tmp_path / "pgbouncer",
    )
    yield bouncer
    bouncer.stop()


@pytest.fixture
def live_env(pgbouncer: Pgbouncer) -> dict[str, str]:
    """The children's environment: the database through pgbouncer, LISTEN past it."""
    from django.db import connection

    return env_with(
        DATABASE_URL=pgbouncer.url(connection.settings_dict["NAME"]),
        DATABASE_TRANSACTION_POOLING="true",
        DATABASE_SESSION_URL=database_url_of(connection.settings_dict),
        LOG_LEVEL="WARNING",
    )


def test_it_carries_mail_from_smtp_to_waiters_through_pgbouncer_in_transaction_mode(
    world: Any, runsmtp: Any, celery_worker: Any, web_server: str, pgbouncer: Pgbouncer
) -> None:
    # The base test asserts the waiters were answered within 1.5 s of indexing: through NOTIFY,
    # which a LISTEN behind a transaction pooler would miss (the safety re-check is 5 s apart).
    mail_path_test(world, runsmtp, celery_worker, web_server)
    from django.db import connection

    # The children really went through the pooler.
    database = connection.settings_dict["NAME"]
    logins = [line for line in pgbouncer.child.lines if f"login attempt: db={database}" in line]
    assert len(logins) >= 3, pgbouncer.child.output[-2000:]  # runsmtp, the worker, uvicorn
