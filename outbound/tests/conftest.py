from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailplatform.testing import free_port
from outbound.tests.harness import Postfix, Sink, SinkHandler

BOUNCE_DOMAIN = "bounces.mailplatform.test"
SINK: dict[str, int] = {}


@pytest.fixture(scope="session")
def _sink() -> Iterator[Sink]:
    sink = Sink()
    SINK["port"] = sink.port
    yield sink
    sink.stop()


@pytest.fixture
def sink(_sink: Sink) -> SinkHandler:
    """The remote MX's handler: what it received, and what it refuses or defers."""
    _sink.handler.reset()
    return _sink.handler


@pytest.fixture(scope="session")
def bounce_port() -> int:
    """The port the bounce test's runsmtp listens on (Postfix sends DSNs for BOUNCE_DOMAIN there)."""
    return free_port()


@pytest.fixture(scope="session")
def postfix(_sink: Sink, bounce_port: int) -> Iterator[Postfix]:
    # Not under pytest's tmp folder: its 0700 parents keep the postfix user out of the queue.
    root = Path(tempfile.mkdtemp(prefix="mp-postfix-"))
    root.chmod(0o755)
    server = Postfix(root, relay_port=_sink.port, bounce_domain=BOUNCE_DOMAIN, bounce_port=bounce_port)
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)
