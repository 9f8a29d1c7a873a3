"""The ASGI entry of the waiting endpoints, without the synchronous middleware.

Django runs a synchronous middleware in its one thread-sensitive worker thread and blocks
that thread until the view returns; a long-poll behind one would serialize every waiter.
The waiting views (mailboxes.api.waiting) need none of the middleware (no cookies, no
sessions, no static files; they bind the request context and error shape themselves), so
mailplatform/asgi.py sends their paths to this handler, which has no middleware at all.
"""

from __future__ import annotations

import re

from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response

_WAITING_PATHS = re.compile(r"^/api/v1/(messages/wait|mailboxes/[0-9a-fA-F-]{32,36}/codes/latest)/$")


def is_waiting_path(path: str) -> bool:
    return bool(_WAITING_PATHS.match(path))


class MiddlewareFreeASGIHandler(ASGIHandler):
    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        # Django wraps each request in a ThreadSensitiveContext, which gives it a thread of its
        # own for synchronous code (here only the request signals and response.close()):
        # a thousand waiters would hold a thousand idle threads. These views run their
        # database work in mailboxes.waiting's pool, so the signals share Django's one thread.
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await self.handle(scope, receive, send)

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware = []  # type: ignore[var-annotated]
        self._template_response_middleware = []  # type: ignore[var-annotated]
        self._exception_middleware = []  # type: ignore[var-annotated]
        self._middleware_chain = convert_exception_to_response(
            self._get_response_async if is_async else self._get_response  # type: ignore[attr-defined]
        )


waiting_application = MiddlewareFreeASGIHandler()
