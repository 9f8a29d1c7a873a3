"""Streaming responses that each server can consume as it streams.

Under ASGI (uvicorn) Django streams only an asynchronous iterator; a synchronous one it reads
whole into memory first, in a thread, with a warning on every response. Under WSGI it is the
other way round. :func:`stream_for` hands the response the iterator its server streams;
:class:`StaticFilesMiddleware` does so for whitenoise's static files.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.http import HttpRequest, StreamingHttpResponse
from whitenoise.middleware import WhiteNoiseMiddleware

Response = TypeVar("Response", bound=StreamingHttpResponse)
_END = object()


def stream_for(request: Any, response: Response, *, uses_database: bool = False) -> Response:
    """Make ``response`` stream asynchronously when ``request`` came through ASGI.

    ``request`` is Django's or DRF's (which hands on ``scope``, an ASGI request's alone).
    ``uses_database``: the iterator queries as it goes, so each step runs in the request's own
    thread (Django's connections belong to a thread); otherwise in any worker thread.
    A FileResponse keeps its headers (length, type) and closes its file as before.
    """
    if getattr(request, "scope", None) is None or response.is_async:
        return response
    parts = iter(response.streaming_content)  # type: ignore[arg-type]
    response.streaming_content = _pulled(parts, thread_sensitive=uses_database)
    return response


async def _pulled(parts: Iterator[Any], *, thread_sensitive: bool) -> AsyncIterator[Any]:
    def step() -> Any:
        return next(parts, _END)

    pull = sync_to_async(step, thread_sensitive=thread_sensitive)
    try:
        while (part := await pull()) is not _END:
            yield part
    finally:
        close = getattr(parts, "close", None)
        if close is not None:
            await sync_to_async(close, thread_sensitive=thread_sensitive)()


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    """whitenoise's middleware, its file responses streamed as the server streams them (its own
    hand a synchronous iterator, read whole and warned about on every static file under ASGI)."""

    def serve(self, static_file: Any, request: HttpRequest) -> StreamingHttpResponse:  # type: ignore[override]
        return stream_for(request, WhiteNoiseMiddleware.serve(static_file, request))
