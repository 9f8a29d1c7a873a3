"""The ASGI handler runs the middleware and the view in one synchronous chain, and every
middleware still does its work: through a real uvicorn process (mailplatform.asgi)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from django.core.handlers.asgi import ASGIHandler

from mailplatform.handlers import SynchronousChainASGIHandler


def test_it_builds_the_middleware_chain_synchronous_where_django_builds_it_async() -> None:
    assert not asyncio.iscoroutinefunction(SynchronousChainASGIHandler()._middleware_chain)
    assert asyncio.iscoroutinefunction(ASGIHandler()._middleware_chain)


def test_every_middleware_does_its_work_behind_the_one_hop_handler(world: Any, web_server: str) -> None:
    with httpx.Client(base_url=web_server, timeout=30) as client:
        api = client.get(
            "/api/v1/tenant/", headers={"Authorization": f"Bearer {world.owner_key}", "X-Request-ID": "req-12345678"}
        )
        assert api.status_code == 200, api.text
        assert api.json()["id"] == str(world.tenant.pk)
        assert api.headers["X-Request-ID"] == "req-12345678"  # audit's request context
        assert "default-src 'self'" in api.headers["Content-Security-Policy"]
        assert api.headers["X-Frame-Options"] == "DENY"
        refused = client.get("/api/v1/tenant/", headers={"Authorization": "Bearer mp_nonsense"})
        assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_api_key")

        page = client.get("/login/")
        assert page.status_code == 200
        assert "csrftoken" in page.cookies  # the CSRF middleware, on a page of the console
        posted = client.post("/login/", data={"email": "nobody@example.test"})
        assert posted.status_code == 403  # no CSRF token sent: refused before the view

        static = client.get("/static/mailplatform.css")
        assert static.status_code == 200  # whitenoise, streamed
        assert static.content.startswith(b"/* mailplatform")


async def _get(application: Any, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=application, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        return await client.get(path, headers=headers or {})


def test_a_request_runs_on_a_kept_thread_of_its_own(transactional_db: Any) -> None:
    import threading
    import time

    from django.core.signals import request_started

    threads: list[threading.Thread] = []

    def record(sender: Any, environ: Any = None, scope: Any = None, **kwargs: Any) -> None:
        threads.append(threading.current_thread())  # request_started runs in the request's thread
        if scope and (b"x-slow", b"1") in scope.get("headers", []):
            time.sleep(0.3)

    handler = SynchronousChainASGIHandler()
    request_started.connect(record)
    try:

        async def scenario() -> list[threading.Thread]:
            first = await _get(handler, "/healthz")
            await asyncio.sleep(0.05)  # the executor comes back once its work has run
            assert handler.threads.idle == 1
            second = await _get(handler, "/healthz")
            assert (first.status_code, second.status_code) == (200, 200), first.text
            await asyncio.sleep(0.05)
            assert handler.threads.idle == 1
            together = await asyncio.gather(*(_get(handler, "/healthz", {"X-Slow": "1"}) for _ in range(2)))
            assert [response.status_code for response in together] == [200, 200]
            await asyncio.sleep(0.05)
            return threads

        seen = asyncio.run(scenario())
    finally:
        request_started.disconnect(record)
    assert seen[0] is seen[1]  # one after the other: the same kept thread, not a new one each
    assert seen[2] is not seen[3]  # at the same time: a thread each
    assert handler.threads.idle == 2


def test_a_thread_still_busy_is_not_lent_until_its_work_is_done() -> None:
    import threading

    from mailplatform.handlers import RequestThreads

    threads = RequestThreads(keep=4)
    release = threading.Event()

    async def scenario() -> tuple[int, int, bool]:
        executor = threads.take()
        executor.submit(release.wait, 5)  # a view still running after its client went away
        threads.give(executor)
        await asyncio.sleep(0.1)
        while_busy = threads.idle
        other = threads.take()  # meanwhile a request gets another thread
        release.set()
        await asyncio.sleep(0.1)
        threads.give(other)
        await asyncio.sleep(0.1)
        return while_busy, threads.idle, other is not executor

    while_busy, after, distinct = asyncio.run(scenario())
    assert (while_busy, after, distinct) == (0, 2, True)
