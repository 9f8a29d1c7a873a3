"""Operations endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import storages
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

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
    url = settings.CELERY_BROKER_URL
    if url.startswith("filesystem://"):
        # The filesystem transport "connects" even to a missing folder; check the folders.
        options = settings.CELERY_BROKER_TRANSPORT_OPTIONS
        for key in ("data_folder_in", "data_folder_out"):
            folder = str(options.get(key) or "")
            if not folder or not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
                raise NotADirectoryError(f"broker folder {key} is missing or not writable")
        return
    from mailplatform.celery import app

    # One attempt, bounded: a broker that is down must not hold the probe (or the pod's
    # readiness) for the transport's default retry schedule.
    with app.connection_for_write(url, connect_timeout=CHECK_TIMEOUT) as conn:
        conn.ensure_connection(max_retries=0, timeout=CHECK_TIMEOUT)


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


# Checks that talk to another server run on this small pool with a deadline, so a hung
# server answers "timeout" within CHECK_TIMEOUT instead of holding the probe; a check still
# stuck keeps its worker busy, which bounds how many can pile up.
CHECK_TIMEOUT = 3.0
_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="readyz")


def _run_checks() -> dict[str, dict[str, object]]:
    started = time.monotonic()
    results: dict[str, dict[str, object]] = {}
    pending = {name: _executor.submit(check) for name, check in CHECKS.items() if name != "database"}
    futures_started = time.monotonic()
    try:
        _check_database()  # inline: Django's connections belong to the request's thread
    except Exception as exc:
        results["database"] = {"ok": False, "error": type(exc).__name__}
    else:
        results["database"] = {"ok": True}
    results["database"]["ms"] = round((time.monotonic() - started) * 1000, 1)
    for name, future in pending.items():
        remaining = max(0.0, CHECK_TIMEOUT - (time.monotonic() - futures_started))
        try:
            future.result(timeout=remaining)
        except FutureTimeout:
            future.cancel()
            results[name] = {"ok": False, "error": "timeout"}
        except Exception as exc:  # any failure means not ready; the reason is reported
            results[name] = {"ok": False, "error": type(exc).__name__}
        else:
            results[name] = {"ok": True}
        results[name]["ms"] = round((time.monotonic() - futures_started) * 1000, 1)
    return {name: results[name] for name in CHECKS}


@never_cache
@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Ready when the database, the broker and blob storage all answer; 503 otherwise.

    The body names each check with ``ok``, the error's type when it failed (never its text,
    which may hold a URL with credentials) and how long it took; then whether mail flows
    through the rest of the platform (``mail_flow``, ``warnings``: stale SMTP nodes, no live
    worker, an old spool entry or unparsed backlog), which leaves the status code alone; and
    with CLAMD_URL set, ``antivirus``: whether clamd answers, and its version.
    """
    antivirus = _antivirus_check_start()
    results = _run_checks()
    failed = [name for name, result in results.items() if not result["ok"]]
    for name in failed:
        logger.warning("readiness check %s failed: %s", name, results[name]["error"])
    body: dict[str, object] = {"status": "unavailable" if failed else "ok", "failed": failed, "checks": results}
    body.update(_mail_flow(detailed=_metrics_allowed(request), database_ok=results["database"]["ok"]))
    if antivirus is not None:
        _antivirus_report(body, *antivirus)
    return JsonResponse(body, status=503 if failed else 200)


def _antivirus_check_start() -> tuple[Future[str], float] | None:
    """clamd's VERSION, asked beside the other checks when CLAMD_URL is set."""
    if not settings.CLAMD_URL:
        return None
    from mailplatform import clamd

    return _executor.submit(clamd.version, timeout=CHECK_TIMEOUT), time.monotonic()


def _antivirus_report(body: dict[str, object], future: Future[str], started: float) -> None:
    """``antivirus`` in the body, and a ``clamd_unavailable`` warning when it does not answer.

    Not a reason for 503: this web node serves without clamd; SMTP in reject mode answers
    451 meanwhile (or accepts, fail-open), and the parse holds quarantine-mode mail.
    """
    remaining = max(0.0, CHECK_TIMEOUT - (time.monotonic() - started))
    result: dict[str, object]
    try:
        result = {"ok": True, "version": future.result(timeout=remaining)}
    except FutureTimeout:
        future.cancel()
        result = {"ok": False, "error": "timeout"}
    except Exception as exc:
        result = {"ok": False, "error": type(exc).__name__}
    result["ms"] = round((time.monotonic() - started) * 1000, 1)
    body["antivirus"] = result
    if not result["ok"]:
        logger.warning("clamd does not answer: %s", result["error"])
        warnings = body.setdefault("warnings", [])
        assert isinstance(warnings, list)
        warnings.append({"code": "clamd_unavailable", "message": "clamd (CLAMD_URL) does not answer."})
        if body.get("mail_flow") == "ok":
            body["mail_flow"] = "degraded"


def _mail_flow(*, detailed: bool, database_ok: object) -> dict[str, object]:
    """Whether mail flows beyond this web node: a warning section, never a reason for 503.

    The web node can serve while a worker or an SMTP node is down, so readiness (which
    takes it out of a balancer) stays with the checks above; ``mail_flow`` is "ok",
    "degraded" (see ``warnings``) or "unknown" (the database did not answer). Node names
    are shown only to those who may read /metrics.
    """
    if not database_ok:
        return {"mail_flow": "unknown", "warnings": []}
    from ingest.heartbeats import mail_flow_status

    try:
        flow = mail_flow_status()
    except Exception as exc:
        logger.warning("mail flow status unavailable: %s", type(exc).__name__)
        return {"mail_flow": "unknown", "warnings": []}
    warnings = flow["warnings"]
    if not detailed:
        warnings = [{key: value for key, value in warning.items() if key != "node"} for warning in warnings]
    body: dict[str, object] = {"mail_flow": flow["status"], "warnings": warnings}
    if detailed:
        body["nodes"] = flow["nodes"]
        body["backlog"] = {
            "spool_oldest_age_seconds": flow["spool_oldest_age_seconds"],
            "unparsed_oldest_age_seconds": flow["unparsed_oldest_age_seconds"],
        }
    return body


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _metrics_allowed(request: HttpRequest) -> bool:
    token = settings.METRICS_TOKEN
    offered = request.headers.get("Authorization", "")
    authorized = bool(token) and hmac.compare_digest(offered.encode(), f"Bearer {token}".encode())
    return authorized or _is_loopback(request.META.get("REMOTE_ADDR"))


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics, for loopback clients or a bearer METRICS_TOKEN.

    In multiprocess mode (METRICS_DIR) the sum over every process of this node: the web
    processes, the Celery workers and beat (mailplatform/metrics.py).
    """
    if not _metrics_allowed(request):
        return json_error_response(
            request, 403, "permission_denied", "Metrics are served to loopback or with the metrics token."
        )
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from mailplatform.metrics import scrape_registry

    return HttpResponse(generate_latest(scrape_registry()), content_type=CONTENT_TYPE_LATEST)
