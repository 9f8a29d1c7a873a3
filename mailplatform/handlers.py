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

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpRequest, HttpResponseBase


class RequestThreads:
    """Single-thread executors lent to requests, one at a time each, and kept between them.

    An executor comes back to the kept set only once everything it was given has run (a
    request cancelled by its client's disconnect may leave its view still running in the
    thread): a request never waits behind another's work. The next request on a thread finds
    the thread's database connection closed or closes it (Django's ``request_started``, with
    CONN_MAX_AGE 0), as on a new thread. Used from the event loop's thread only.
    """

    def __init__(self, keep: int = 32) -> None:
        self._idle: list[ThreadPoolExecutor] = []
        self._keep = keep

    def take(self) -> ThreadPoolExecutor:
        if self._idle:
            return self._idle.pop()
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="request")

    def give(self, executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()

        def settled(_: Future[None]) -> None:  # in the worker thread, or here if already idle
            try:
                loop.call_soon_threadsafe(self._keep_or_shut, executor)
            except RuntimeError:  # the loop is closed: the server is stopping
                executor.shutdown(wait=False)

        executor.submit(_nothing).add_done_callback(settled)

    def _keep_or_shut(self, executor: ThreadPoolExecutor) -> None:
        if len(self._idle) < self._keep:
            self._idle.append(executor)
        else:
            executor.shutdown(wait=False)

    @property
    def idle(self) -> int:
        return len(self._idle)


def _nothing() -> None:
    pass


class SynchronousChainASGIHandler(ASGIHandler):
    def __init__(self, threads: RequestThreads | None = None) -> None:
        super().__init__()
        self.threads = threads or RequestThreads()

    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=False)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        executor = self.threads.take()
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            self.threads.give(executor)

    async def get_response_async(self, request: HttpRequest) -> HttpResponseBase:
        return await sync_to_async(self.get_response, thread_sensitive=True)(request)
