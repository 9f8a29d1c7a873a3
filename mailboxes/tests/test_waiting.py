"""Waiting for mail through a real uvicorn process (ASGI), woken by PostgreSQL NOTIFY."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from urllib.parse import urlencode

import httpx
import pytest
from django.db import connection

from mailboxes.tests.helpers import message_deliver, simple_message


@pytest.fixture
def web(web_server: str) -> str:
    return web_server


def _deliver(mailbox, raw: bytes) -> None:
    """Store, parse and index in a worker thread, then close that thread's connection."""
    try:
        message_deliver(mailbox, raw)
    finally:
        connection.close()


async def _get(url: str, path: str, key: str) -> tuple[int, dict]:
    """A bare HTTP/1.0 GET (no chunking) on its own connection: 200 of these cost the test client little."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET {path} HTTP/1.0\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    response = await reader.read()
    writer.close()
    status, _, body = response.partition(b"\r\n\r\n")
    return int(status.split()[1]), json.loads(body)


async def _until_waiting(web: str, count: int, timeout: float = 60.0) -> None:
    """Until the web process says ``count`` requests wait (its mailboxes_waiters gauge)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=web, timeout=10) as client:
        while True:
            metrics = (await client.get("/metrics")).text
            waiting = [line for line in metrics.splitlines() if line.startswith("mailboxes_waiters ")]
            if waiting and float(waiting[0].split()[1]) >= count:
                return
            assert time.monotonic() < deadline, f"not {count} waiters after {timeout} s: {waiting}"
            await asyncio.sleep(0.2)


def test_it_wakes_200_concurrent_waiters_within_a_second_of_indexing(world, web):
    key = world.owner_key
    mailboxes = [world.mailbox, world.sibling]
    since = datetime.fromtimestamp(time.time() - 1, tz=UTC).isoformat()

    async def waiters() -> tuple[list[tuple[int, dict]], list[float]]:
        answered: dict[int, float] = {}

        async def wait(number: int) -> tuple[int, dict]:
            query = urlencode({"mailbox": str(mailboxes[number % 2].pk), "after": since, "timeout": 60})
            response = await _get(web, f"/api/v1/messages/wait/?{query}", key)
            answered[number] = time.monotonic()
            return response

        tasks = [asyncio.create_task(wait(number)) for number in range(200)]
        await _until_waiting(web, 200)
        assert not any(task.done() for task in tasks)
        indexed = []
        for mailbox in mailboxes:
            await asyncio.to_thread(_deliver, mailbox, simple_message(f"for {mailbox.local_part}"))
            indexed.append(time.monotonic())  # the index transaction has committed
        responses = await asyncio.gather(*tasks)
        return responses, [answered[number] - indexed[number % 2] for number in range(200)]

    responses, delays = asyncio.run(waiters())
    print(f"200 waiters answered {max(delays):.2f} s at most after their message was indexed")
    assert [status for status, _ in responses] == [200] * 200
    for index, (_, body) in enumerate(responses):
        assert body["mailbox"] == str(mailboxes[index % 2].pk)
    assert max(delays) < 1.5  # about a second, with room for a busy 2-core test machine


def test_it_answers_408_on_timeout_and_401_without_a_key(world, web):
    timed_out = httpx.get(
        f"{web}/api/v1/messages/wait/",
        params={"timeout": 1, "q": "subject:nothing-like-this"},
        headers={"Authorization": f"Bearer {world.owner_key}"},
        timeout=10,
    )
    assert timed_out.status_code == 408
    assert timed_out.json()["error"]["code"] == "timeout"
    anonymous = httpx.get(f"{web}/api/v1/messages/wait/", timeout=10)
    assert anonymous.status_code == 401
    outsider = httpx.get(
        f"{web}/api/v1/mailboxes/{world.mailbox.pk}/codes/latest/",
        params={"wait": 1},
        headers={"Authorization": f"Bearer {world.outsider_key}"},
        timeout=10,
    )
    assert outsider.status_code == 404


def test_it_returns_a_code_to_a_waiter_within_a_second_of_indexing(world, web):
    async def scenario() -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(base_url=web, timeout=30) as client:
            request = asyncio.create_task(
                client.get(
                    f"/api/v1/mailboxes/{world.mailbox.pk}/codes/latest/",
                    params={"wait": 20},
                    headers={"Authorization": f"Bearer {world.owner_key}"},
                )
            )
            await asyncio.sleep(1.5)
            await asyncio.to_thread(_deliver, world.mailbox, simple_message("Your verification code", "Code: 918273"))
            indexed = time.monotonic()
            response = await request
            return response, time.monotonic() - indexed

    response, delay = asyncio.run(scenario())
    assert response.status_code == 200, response.content
    assert response.json()["code"] == "918273"
    assert delay < 1.0


def test_it_does_not_log_a_wait_that_ends_without_a_message(world, live_env):
    from mailplatform.testing import start_uvicorn

    server = start_uvicorn(env={**live_env, "LOG_LEVEL": "INFO"})
    try:
        timed_out = httpx.get(
            f"{server.url}/api/v1/messages/wait/",
            params={"timeout": 1, "q": "subject:nothing-like-this"},
            headers={"Authorization": f"Bearer {world.owner_key}"},
            timeout=10,
        )
        missing = httpx.get(f"{server.url}/api/v1/messages/{world.mailbox.pk}/", timeout=10)
        deadline = time.monotonic() + 10
        while "/api/v1/messages/" + str(world.mailbox.pk) not in server.child.output and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.stop()
    assert timed_out.status_code == 408 and missing.status_code == 401
    output = server.child.output
    assert "Unauthorized: /api/v1/messages/" in output  # django.request logs the client error
    assert "Request Timeout: /api/v1/messages/wait/" not in output, output[-3000:]  # not a wait that ended
