"""/healthz, /readyz and /metrics against the real database, brokers and S3 server."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client, override_settings

from mailplatform.testing import free_port, storages_setting

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture
def client() -> Client:
    return Client()


def _ready(client: Client) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    response = client.get("/readyz")
    elapsed = time.monotonic() - started
    assert response["Content-Type"] == "application/json"
    assert "no-cache" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]
    return response.status_code, response.json(), elapsed


def test_it_answers_healthz_without_touching_anything(client: Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_it_is_ready_against_the_real_database_redis_and_s3(client: Client, db: Any) -> None:
    assert settings.CELERY_BROKER_URL.startswith("redis://")
    assert settings.STORAGES["blobs"]["BACKEND"] == "storages.backends.s3.S3Storage"
    status, body, _ = _ready(client)
    assert status == 200, body
    assert body["status"] == "ok"
    assert body["failed"] == []
    assert set(body["checks"]) == {"database", "broker", "blobs"}
    assert all(check["ok"] is True and check["ms"] >= 0 for check in body["checks"].values())


def test_it_is_ready_against_rabbitmq(client: Client, db: Any) -> None:
    with override_settings(CELERY_BROKER_URL=RABBITMQ_URL):
        status, body, _ = _ready(client)
    assert status == 200, body
    assert body["checks"]["broker"]["ok"] is True


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_it_names_the_broker_and_fails_fast_when_the_broker_is_down(client: Client, db: Any, scheme: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0" if scheme == "redis" else f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    with override_settings(CELERY_BROKER_URL=url):
        status, body, elapsed = _ready(client)
    assert status == 503
    assert body["status"] == "unavailable"
    assert body["failed"] == ["broker"]
    assert body["checks"]["broker"]["ok"] is False
    assert body["checks"]["broker"]["error"]
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["blobs"]["ok"] is True
    assert elapsed < 3.5


def test_it_never_puts_broker_credentials_in_the_answer(client: Client, db: Any) -> None:
    url = f"amqp://guest:hunter2-secret@127.0.0.1:{free_port()}//"
    with override_settings(CELERY_BROKER_URL=url):
        response = client.get("/readyz")
    assert response.status_code == 503
    assert b"hunter2" not in response.content


def test_it_names_blob_storage_when_the_s3_server_is_unreachable(client: Client, db: Any, s3_server: Any) -> None:
    broken = storages_setting(s3_server, settings.STORAGES)
    for name in ("default", "blobs"):
        broken[name] = {**broken[name], "OPTIONS": {**broken[name]["OPTIONS"]}}  # type: ignore[dict-item]
        broken[name]["OPTIONS"]["endpoint_url"] = f"http://127.0.0.1:{free_port()}"  # type: ignore[index]
    with override_settings(STORAGES=broken):
        status, body, elapsed = _ready(client)
    assert status == 503
    assert body["failed"] == ["blobs"]
    assert body["checks"]["blobs"]["ok"] is False
    assert body["checks"]["broker"]["ok"] is True
    assert elapsed < 3.5


def test_it_checks_the_filesystem_broker_folders(client: Client, db: Any, tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    queue.mkdir()
    options = {"data_folder_in": str(queue), "data_folder_out": str(queue), "processed_folder": str(tmp_path)}
    with override_settings(CELERY_BROKER_URL="filesystem://", CELERY_BROKER_TRANSPORT_OPTIONS=options):
        status, body, _ = _ready(client)
        assert status == 200, body
        queue.rmdir()
        status, body, _ = _ready(client)
    assert status == 503
    assert body["failed"] == ["broker"]


def test_it_serves_metrics_to_loopback(client: Client, db: Any) -> None:
    for address in ("127.0.0.1", "::1"):
        response = client.get("/metrics", REMOTE_ADDR=address)
        assert response.status_code == 200, address
        assert b"django_http_requests_total" in response.content or b"python_info" in response.content


def test_it_refuses_metrics_to_other_addresses(client: Client, db: Any) -> None:
    for address in ("203.0.113.7", "10.1.2.3", "2001:db8::1", "not-an-address"):
        response = client.get("/metrics", REMOTE_ADDR=address)
        assert response.status_code == 403, address
        assert response.json()["error"]["code"] == "permission_denied"


@override_settings(METRICS_TOKEN="metrics-token-for-tests-0123456789")
def test_it_serves_metrics_with_the_bearer_token(client: Client, db: Any) -> None:
    remote = {"REMOTE_ADDR": "203.0.113.7"}
    good = client.get("/metrics", HTTP_AUTHORIZATION="Bearer metrics-token-for-tests-0123456789", **remote)
    assert good.status_code == 200
    assert b"python_info" in good.content
    for offered in ("Bearer wrong", "metrics-token-for-tests-0123456789", "Bearer ", "Basic abc"):
        response = client.get("/metrics", HTTP_AUTHORIZATION=offered, **remote)
        assert response.status_code == 403, offered
    assert client.get("/metrics", **remote).status_code == 403


def test_it_refuses_the_bearer_route_when_no_token_is_configured(client: Client, db: Any) -> None:
    assert settings.METRICS_TOKEN == ""
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer ", REMOTE_ADDR="203.0.113.7")
    assert response.status_code == 403


def test_it_answers_only_get_on_the_probes(client: Client, db: Any) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.post(path).status_code == 405
