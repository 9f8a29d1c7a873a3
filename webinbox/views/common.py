"""What the inbox and the temporary inbox share: the message list and the message view."""

from __future__ import annotations

import html
from typing import Any
from uuid import UUID

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils.dateparse import parse_datetime
from django.views.decorators.clickjacking import xframe_options_sameorigin

from mailboxes import blobs
from mailboxes.models import Message
from mailboxes.sanitize import cid_map, html_render
from mailboxes.search import QuerySyntaxError
from tenants.access import Principal
from webinbox import selectors

RAW_PREVIEW_LIMIT = 256 * 1024


def list_context(principal: Principal, request: HttpRequest, *, mailbox_id: UUID | None) -> dict[str, Any]:
    query = request.GET.get("q", "")[:500]
    before = request.GET.get("before", "")[:200]
    error = ""
    try:
        page = selectors.message_page(principal, mailbox_id=mailbox_id, query=query, before=before)
    except QuerySyntaxError as exc:
        page, error = selectors.MessagePage([], None, None), str(exc)
    return {
        "page": page,
        # Not "messages": that name belongs to django.contrib.messages (the flash notices in
        # base.html); shadowing it showed the mail list as notices and held real ones back.
        "mail_list": page.messages,
        "query": query,
        "query_error": error,
        "cursor": (page.newest_created.isoformat() if page.newest_created else ""),
        "pending": any(message.state == Message.State.STORED for message in page.messages),
    }


def poll_response(principal: Principal, request: HttpRequest, *, mailbox_id: UUID | None) -> JsonResponse:
    """``{"changed": bool}``: whether a message arrived after ``since`` (the live-update check)."""
    since = parse_datetime(request.GET.get("since", "").replace(" ", "+")[:64]) if request.GET.get("since") else None
    if since is None:
        changed = selectors.message_page(principal, mailbox_id=mailbox_id).messages != []
    else:
        changed = selectors.messages_changed_since(principal, mailbox_id=mailbox_id, since=since)
    response = JsonResponse({"changed": changed})
    response["Cache-Control"] = "no-store"
    return response


def _signed(key: str, filename: str, content_type: str, inline: bool = False) -> str:
    return blobs.blob_signed_url(key, filename=filename, content_type=content_type, inline=inline)


def message_context(message: Message, request: HttpRequest, *, body_url: str) -> dict[str, Any]:
    tab = request.GET.get("tab", "html")
    if tab not in {"html", "text", "raw", "headers"}:
        tab = "html"
    if tab == "html" and not message.html:
        tab = "text"
    raw_text, raw_truncated = "", False
    if tab == "raw":
        try:
            with blobs.blob_storage().open(message.storage_key, "rb") as handle:
                data = handle.read(RAW_PREVIEW_LIMIT + 1)
            raw_truncated = len(data) > RAW_PREVIEW_LIMIT
            raw_text = data[:RAW_PREVIEW_LIMIT].decode("utf-8", "replace")
        except Exception:
            raw_text = "The raw message is not available right now."
    attachments = [
        {
            "filename": attachment.filename or "attachment",
            "content_type": attachment.content_type,
            "size": attachment.size,
            "url": _signed(attachment.storage_key, attachment.filename or "attachment", attachment.content_type),
        }
        for attachment in message.attachments.all()
        if not attachment.is_inline
    ]
    return {
        "message": message,
        "tab": tab,
        "body_url": body_url,
        "images": request.GET.get("images") == "1",
        "has_remote_images": "data-remote-src=" in message.html,
        "raw_text": raw_text,
        "raw_truncated": raw_truncated,
        "raw_url": _signed(message.storage_key, f"{message.pk}.eml", "message/rfc822"),
        "attachments": attachments,
        "signed_ttl_minutes": settings.SIGNED_URL_TTL // 60,
    }


_BODY_STYLE = (
    "body{font:15px/1.5 system-ui,sans-serif;margin:12px;color:#1b1f24;background:#fff;word-wrap:break-word}"
    "img{max-width:100%;height:auto}pre{white-space:pre-wrap}"
)


@xframe_options_sameorigin
def message_body(request: HttpRequest, message: Message) -> HttpResponse:
    """The sanitized HTML body as its own document, for the sandboxed iframe.

    Its policy allows no script at all, inline styles only, and images from data: and the
    blob store (cid: parts); remote images only after "load images". ``sandbox`` in the CSP
    makes it a unique origin even if opened outside the iframe.
    """
    remote = request.GET.get("images") == "1"
    inline_parts = {
        attachment.content_id: _signed(
            attachment.storage_key, attachment.filename or "image", attachment.content_type, inline=True
        )
        for attachment in message.attachments.all()
        if attachment.content_id
    }
    if message.html:
        content = html_render(message.html, cid_url=cid_map(inline_parts), remote_images=remote)
    else:
        content = f"<pre>{html.escape(message.text)}</pre>"
    document = (
        '<!doctype html><html><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">'
        f'<base target="_blank"><style>{_BODY_STYLE}</style></head><body>{content}</body></html>'
    )
    image_sources = "data: https: http:" if remote else f"data: {_blob_origin()}"
    response = HttpResponse(document, content_type="text/html; charset=utf-8")
    response["Content-Security-Policy"] = (
        f"default-src 'none'; style-src 'unsafe-inline'; img-src {image_sources}; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'self'; "
        "sandbox allow-popups allow-popups-to-escape-sandbox"
    )
    response["Referrer-Policy"] = "no-referrer"
    response["Cache-Control"] = "private, no-store"
    return response


def _blob_origin() -> str:
    from urllib.parse import urlsplit

    endpoint = getattr(blobs.blob_storage(), "endpoint_url", None) or settings.BASE_URL
    parts = urlsplit(str(endpoint))
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else "'self'"


def render_list(request: HttpRequest, template: str, context: dict[str, Any]) -> HttpResponse:
    """The whole page, or only the list when the live-update script asks for it."""
    if request.GET.get("partial") == "1":
        return render(request, "webinbox/_message_list.html", context)
    return render(request, template, context)
