"""Downloads from the local blob folder through signed, expiring links (S3 presigns instead)."""

from __future__ import annotations

import uuid

from django.core import signing
from django.http import FileResponse, HttpRequest, HttpResponse
from django.views.decorators.http import require_GET

from mailboxes import blobs
from mailplatform.api import json_error_response
from mailplatform.streams import stream_for
from tenants.access import TenantSuspended, tenant_ensure_active
from tenants.models import Tenant


@require_GET
def blob_download(request: HttpRequest, token: str) -> HttpResponse | FileResponse:
    """Serve the object a token names, while the token is valid (``SIGNED_URL_TTL``)."""
    try:
        payload = blobs.blob_token_read(token)
    except signing.BadSignature:
        return json_error_response(request, 404, "not_found", "This download link is invalid or has expired.")
    key = str(payload["k"])
    # Every blob key names its tenant (raw/<tenant>/..., att/<tenant>/...): a link signed
    # before the tenant was suspended stops working with it, like the tenant's other doors.
    tenant = _owner(key)
    if tenant is None:
        return json_error_response(request, 404, "not_found", "Not found.")
    try:
        tenant_ensure_active(tenant)
    except TenantSuspended as refusal:
        return json_error_response(request, 403, refusal.code, str(refusal))
    storage = blobs.blob_storage()
    if not storage.exists(key):
        return json_error_response(request, 404, "not_found", "Not found.")
    response = stream_for(request, FileResponse(storage.open(key, "rb"), content_type=str(payload["t"])))
    response["Content-Disposition"] = blobs.disposition(str(payload["f"]), bool(payload["i"]))
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    response["Cache-Control"] = "private, no-store"
    return response


def _owner(key: str) -> Tenant | None:
    parts = key.split("/")
    try:
        tenant_id = uuid.UUID(parts[1]) if len(parts) > 2 else None
    except ValueError:
        return None
    return Tenant.objects.filter(pk=tenant_id).only("status").first() if tenant_id else None
