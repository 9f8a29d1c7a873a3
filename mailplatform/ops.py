"""Operations endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
import uuid
from collections.abc import Callable

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import storages
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from django_prometheus.exports import ExportToDjangoView

from mailplatform.api import json_error_response

logger = logging.getLogger(__name__)


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """The process is up and serving. Touches nothing else."""
    return JsonResponse({"status": "ok"})


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def _check_broker() -> None:
    from mailplatform.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
        # The filesystem transport "connects" even to a missing folder; make it prove it.
        conn.default_channel.client  # noqa: B018


def _check_blobs() -> None:
    storage = storages["blobs"]
    name = f"health/{uuid.uuid4().hex}"
    storage.save(name, ContentFile(b"ok"))
    try:
        with storage.open(name) as handle:
            if handle.read() != b"ok":
                raise RuntimeError("read back different bytes")
    finally:
        storage.delete(name)


CHECKS: dict[str, Callable[[], None]] = {
    "database": _check_database,
    "broker": _check_broker,
    "blobs": _check_blobs,
}


@never_cache
@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Ready when the database, the broker and blob storage all answer; 503 otherwise."""
    results: dict[str, dict[str, object]] = {}
    ready = True
    for name, check in CHECKS.items():
        started = time.monotonic()
        try:
            check()
        except Exception as exc:  # any failure means not ready; the reason is reported
            ready = False
            logger.warning("readiness check %s failed: %s", name, exc)
            results[name] = {"ok": False, "error": type(exc).__name__}
        else:
            results[name] = {"ok": True}
        results[name]["ms"] = round((time.monotonic() - started) * 1000, 1)
    return JsonResponse({"status": "ok" if ready else "unavailable", "checks": results}, status=200 if ready else 503)


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics, for loopback clients or a bearer METRICS_TOKEN."""
    token = settings.METRICS_TOKEN
    offered = request.headers.get("Authorization", "")
    authorized = bool(token) and hmac.compare_digest(offered.encode(), f"Bearer {token}".encode())
    if not (authorized or _is_loopback(request.META.get("REMOTE_ADDR"))):
        return json_error_response(
            request, 403, "permission_denied", "Metrics are served to loopback or with the metrics token."
        )
    return ExportToDjangoView(request)
