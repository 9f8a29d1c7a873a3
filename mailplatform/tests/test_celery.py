"""A real Celery worker runs the maintenance task over real Redis and RabbitMQ brokers."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.db import connection
from django.utils import timezone

from mailplatform.celery import QUEUES, app
from mailplatform.testing import ROOT, ChildProcess, env_with, runtime_venv_python, start_celery_worker
from tenants.models import User
from webinbox.models import LoginToken
from webinbox.services import login_link_create, login_tokens_purge
from webinbox.tasks import login_tokens_purge as login_tokens_purge_task

# A Redis database of its own, so the round trip never meets another test's messages.
REDIS_URL = "redis://127.0.0.1:6379/13"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _test_database_url() -> str:
    """The URL of the database this test runs on (pytest-django's test_ copy)."""
    config = connection.settings_dict
    assert connection.vendor == "postgresql", "the round trip runs on PostgreSQL"
    password = f":{quote(config['PASSWORD'], safe='')}" if config.get("PASSWORD") else ""
    user = quote(config["USER"], safe="")
    return f"postgres://{user}{password}@{config['HOST']}:{config['PORT'] or 5432}/{config['NAME']}"


def _stale_and_fresh_tokens() -> tuple[LoginToken, LoginToken]:
    user = User.objects.create_user(email="roundtrip@example.test")
    stale = LoginToken.objects.create(
        user=user, token_hash=uuid.uuid4().hex, expires_at=timezone.now() - timedelta(days=3)
    )
    login_link_create(user=user)
    fresh = LoginToken.objects.exclude(pk=stale.pk).get(user=user)
    return stale, fresh


@pytest.fixture
def worker_on(transactional_db: Any, tmp_path: Path) -> Iterator[Any]:
    """Start a worker on a given broker, consuming a queue unique to this test."""
    started: list[tuple[ChildProcess, str, str]] = []

    def start(broker_url: str, python: str | None = None) -> tuple[ChildProcess, str]:
        queue = f"maintenance-test-{uuid.uuid4().hex[:12]}"
        env = env_with(
            CELERY_BROKER_URL=broker_url,
            DATABASE_URL=_test_database_url(),
            DATA_DIR=str(tmp_path / "data"),
            LOG_FORMAT="text",
            LOG_LEVEL="INFO",
        )
        worker = start_celery_worker(queue=queue, env=env, python=python)
        started.append((worker, broker_url, queue))
        return worker, queue

    yield start
    for worker, broker_url, queue in started:
        worker.stop()
        # Leave nothing behind on the broker.
        with app.connection_for_write(broker_url) as conn:
            channel = conn.default_channel
            try:
                channel.queue_delete(queue)
                channel.exchange_delete(queue)
            except Exception:  # noqa: S110 - already gone is fine
                pass
        if broker_url.startswith("redis://"):
            _redis_forget(broker_url, queue)


def _redis_forget(broker_url: str, name: str) -> None:
    """Kombu's Redis transport keeps binding keys after a queue is deleted; drop ours."""
    import redis

    client = redis.Redis.from_url(broker_url)
    try:
        for key in client.scan_iter(match=f"*{name}*"):
            client.delete(key)
    finally:
        client.close()


def _send_and_wait(broker_url: str, queue: str, worker: ChildProcess, stale: LoginToken) -> float:
    started = time.monotonic()
    with app.connection_for_write(broker_url) as conn, conn.Producer() as producer:
        login_tokens_purge_task.apply_async(kwargs={"grace_seconds": 3600}, queue=queue, producer=producer)
    deadline = started + 60  # generous: a loaded 2-core CI machine; it takes ~1 s when idle
    while LoginToken.objects.filter(pk=stale.pk).exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"the worker did not run the task:\n{worker.output[-3000:]}")
        time.sleep(0.1)
    return time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("broker_url", [REDIS_URL, RABBITMQ_URL], ids=["redis", "rabbitmq"])
def test_it_runs_the_maintenance_task_in_a_real_worker(worker_on: Any, broker_url: str) -> None:
    stale, fresh = _stale_and_fresh_tokens()
    worker, queue = worker_on(broker_url)
    elapsed = _send_and_wait(broker_url, queue, worker, stale)
    assert elapsed < 60
    assert LoginToken.objects.filter(pk=fresh.pk).exists()
    assert "webinbox.tasks.login_tokens_purge" in worker.output
    assert "succeeded" in worker.output


@pytest.fixture(scope="session")
def runtime_python() -> str:
    """The interpreter of a virtual environment built from requirements.txt alone (what the
    container image installs), so a runtime import that only requirements-dev.txt brings in
    fails here as it would in production. Cached under var/ by the file's hash."""
    return runtime_venv_python()


@pytest.mark.slow
@pytest.mark.parametrize("broker_url", [REDIS_URL, RABBITMQ_URL], ids=["redis", "rabbitmq"])
def test_it_runs_a_task_in_a_worker_installed_from_requirements_txt_alone(
    worker_on: Any, broker_url: str, runtime_python: str
) -> None:
    stale, fresh = _stale_and_fresh_tokens()
    worker, queue = worker_on(broker_url, python=runtime_python)
    _send_and_wait(broker_url, queue, worker, stale)
    assert LoginToken.objects.filter(pk=fresh.pk).exists()
    assert "succeeded" in worker.output
    assert "ModuleNotFoundError" not in worker.output


# Every module of the product (not tests, benchmarks or scripts), and the transports and
# servers the settings can select, imported by the requirements.txt-only interpreter.
_IMPORT_EVERYTHING = """
import importlib, os, pathlib, sys
import django
django.setup()
failed = []
names = [
    "kombu.transport.redis", "kombu.transport.pyamqp", "kombu.transport.filesystem",
    "celery.concurrency.prefork", "django_celery_beat.schedulers", "uvicorn.main", "gunicorn.app.wsgiapp",
]
for path in sorted(pathlib.Path(".").glob("*/**/*.py")):
    parts = path.with_suffix("").parts
    if parts[0] in {"bench", "docs", "scripts", "tests", "var", "static", "templates"} or parts[0].startswith("."):
        continue
    if "tests" in parts or "migrations" in parts or parts[-1] == "testing":
        continue
    names.append(".".join(parts).removesuffix(".__init__"))
for name in names:
    try:
        importlib.import_module(name)
    except ImportError as error:
        failed.append(f"{name}: {error}")
print("\\n".join(failed) or "all imported")
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_it_imports_every_runtime_module_from_requirements_txt_alone(runtime_python: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [runtime_python, "-c", _IMPORT_EVERYTHING],
        cwd=ROOT,
        env=env_with(DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "all imported" in result.stdout


def test_it_purges_only_old_expired_or_used_links(db: Any) -> None:
    user = User.objects.create_user(email="purge@example.test")
    now = timezone.now()
    old_expired = LoginToken.objects.create(user=user, token_hash="a" * 64, expires_at=now - timedelta(days=2))
    old_used = LoginToken.objects.create(
        user=user, token_hash="b" * 64, expires_at=now + timedelta(minutes=5), used_at=now - timedelta(days=2)
    )
    recently_expired = LoginToken.objects.create(user=user, token_hash="c" * 64, expires_at=now - timedelta(hours=1))
    valid = LoginToken.objects.create(user=user, token_hash="d" * 64, expires_at=now + timedelta(minutes=5))
    assert login_tokens_purge() == 2
    remaining = set(LoginToken.objects.values_list("pk", flat=True))
    assert remaining == {recently_expired.pk, valid.pk}
    assert old_expired.pk not in remaining
    assert old_used.pk not in remaining
    assert login_tokens_purge() == 0


def test_it_routes_the_maintenance_task_to_the_maintenance_queue() -> None:
    route = app.amqp.router.route({}, login_tokens_purge_task.name)
    assert route["queue"].name == "maintenance"
    assert login_tokens_purge_task.acks_late is True


def test_it_puts_each_task_in_exactly_one_queue() -> None:
    """Publish one task per route through the app's own queues on Redis (a database of our
    own, so no worker consumes them): each lands in its queue only, not in all five."""
    routes = {
        "maintenance": "webinbox.tasks.login_tokens_purge",
        "parse": "mailboxes.tasks.message_parse",
        "webhooks": "webhooks.tasks.deliveries_dispatch",
    }
    # Other tests send to queues of their own, which Celery adds to app.amqp.queues; only
    # the app's five declared queues matter here.
    assert QUEUES == ("ingest", "parse", "index", "webhooks", "maintenance", "outbound")
    declared = {name: app.amqp.queues[name] for name in QUEUES}
    assert {name: (queue.exchange.name, queue.routing_key) for name, queue in declared.items()} == {
        name: (name, name) for name in QUEUES
    }
    with app.connection_for_write(REDIS_URL) as conn:
        channel = conn.default_channel
        queues = {name: queue(channel) for name, queue in declared.items()}
        try:
            for queue in queues.values():
                queue.declare()
                queue.purge()
            with conn.Producer() as producer:
                for task_name in routes.values():
                    app.send_task(task_name, producer=producer)
            counts = {name: queue.queue_declare().message_count for name, queue in queues.items()}
        finally:
            for queue in queues.values():
                queue.delete()
    for name in declared:
        _redis_forget(REDIS_URL, name)
    assert counts == {name: int(name in routes) for name in queues}
