"""The ASGI handler of everything but the waiting endpoints: the middleware and the view in
one worker-thread hop.

Django's own ASGIHandler builds the middleware chain in async mode. Ours is synchronous
(our middleware, whitenoise, the session, CSRF and authentication ones all run their
synchronous code), and so are the views, so Django adapted the chain with a thread hop at
each switch between a synchronous middleware and an asynchronous-capable one: from the loop
into the request's thread, back to the loop for the async-capable middleware, into the thread
again for the view, about 10 ms of CPU a request on this machine for ``GET /api/v1/tenant/``
before any query. Here the chain is built synchronous from end to end and runs in the
request's thread (Django's ThreadSensitiveContext: one thread per request, where its
database connection lives and the request signals run) with one hop.

An async view behind this handler still works: Django calls it through ``async_to_sync``.
The long-poll endpoints, which wait for minutes, do not come here (mailboxes/asgi.py).
"""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpRequest, HttpResponseBase


class SynchronousChainASGIHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=False)

    async def get_response_async(self, request: HttpRequest) -> HttpResponseBase:
        return await sync_to_async(self.get_response, thread_sensitive=True)(request)
