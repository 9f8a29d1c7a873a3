"""One IMAP and one POP3 server per test module, in this process on free loopback ports.

The servers' database work runs on connections of their own, so the tests that use them
commit their data (``django_db(transaction=True)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from mailaccess.server import ServerThread


@pytest.fixture(scope="module")
def imap_server(django_db_setup: Any, django_db_blocker: Any) -> Iterator[ServerThread]:
    with django_db_blocker.unblock():
        server = ServerThread("imap").start()
        yield server
        server.stop()


@pytest.fixture(scope="module")
def pop3_server(django_db_setup: Any, django_db_blocker: Any) -> Iterator[ServerThread]:
    with django_db_blocker.unblock():
        server = ServerThread("pop3").start()
        yield server
        server.stop()
