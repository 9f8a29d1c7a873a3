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
