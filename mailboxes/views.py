"""Downloads from the local blob folder through signed, expiring links (S3 presigns instead)."""

from __future__ import annotations

from django.core import signing
from django.http import FileResponse, HttpRequest, HttpResponse
from django.views.decorators.http import require_GET

from mailboxes import blobs
from mailplatform.api import json_error_response


@require_GET
def blob_download(request: HttpRequest, token: str) -> HttpResponse | FileResponse:
    """Serve the object a token names, while the token is valid (``SIGNED_URL_TTL``)."""
    try:
        payload = blobs.blob_token_read(token)
    except signing.BadSignature:
        return json_error_response(request, 404, "not_found", "This download link is invalid or has expired.")
    key = str(payload["k"])
    storage = blobs.blob_storage()
    if not storage.exists(key):
        return json_error_response(request, 404, "not_found", "Not found.")
    response = FileResponse(storage.open(key, "rb"), content_type=str(payload["t"]))
    response["Content-Disposition"] = blobs.disposition(str(payload["f"]), bool(payload["i"]))
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    response["Cache-Control"] = "private, no-store"
    return response
