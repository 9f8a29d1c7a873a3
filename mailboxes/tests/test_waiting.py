"""Waiting for mail through a real uvicorn process (ASGI), woken by PostgreSQL NOTIFY."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx
import pytest
from django.db import connection

from mailboxes.tests.helpers import message_deliver, message_store, simple_message
from mailplatform.testing import ChildProcess, env_with, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def web(transactional_db):
    """uvicorn serving mailplatform.asgi against the test database."""
    settings_dict = connection.settings_dict
    port = free_port()
    url = f"postgres://{settings_dict['USER']}@{settings_dict['HOST'] or '127.0.0.1'}:{settings_dict['PORT'] or 5432}"
    server = ChildProcess(
        [sys.executable, "-m", "uvicorn", "mailplatform.asgi:application", "--port", str(port), "--lifespan", "off"],
        env=env_with(DATABASE_URL=f"{url}/{settings_dict['NAME']}", LOG_LEVEL="WARNING"),
        cwd=ROOT,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_it_wakes_200_concurrent_waiters_when_their_messages_are_indexed(world, web):
    key = world.owner_key
    mailboxes = [world.mailbox, world.sibling]

    async def waiters() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=web, timeout=60, limits=limits) as client:
            headers = {"Authorization": f"Bearer {key}"}
            after = await asyncio.to_thread(lambda: time.time())
            from datetime import UTC, datetime

            since = datetime.fromtimestamp(after - 1, tz=UTC).isoformat()
            tasks = [
                asyncio.create_task(
                    client.get(
                        "/api/v1/messages/wait/",
                        params={"mailbox": str(mailboxes[i % 2].pk), "after": since, "timeout": 30},
                        headers=headers,
                    )
                )
                for i in range(200)
            ]
            await asyncio.sleep(3)  # all connected and listening
            assert not any(task.done() for task in tasks)
            for mailbox in mailboxes:
                await asyncio.to_thread(message_deliver, mailbox, simple_message(f"for {mailbox.local_part}"))
            started = time.monotonic()
            responses = await asyncio.gather(*tasks)
            elapsed = time.monotonic() - started
            print(f"200 waiters answered {elapsed:.2f} s after indexing")
            assert elapsed < 15
            return responses

    responses = asyncio.run(waiters())
    assert [response.status_code for response in responses] == [200] * 200
    for index, response in enumerate(responses):
        assert response.json()["mailbox"] == str(mailboxes[index % 2].pk)


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
            message = await asyncio.to_thread(
                message_store, world.mailbox, simple_message("Your verification code", "Code: 918273")
            )
            from mailboxes import pipeline

            await asyncio.to_thread(pipeline.message_parse, message_id=message.pk)
            await asyncio.to_thread(pipeline.message_index, message_id=message.pk)
            indexed = time.monotonic()
            response = await request
            return response, time.monotonic() - indexed

    response, delay = asyncio.run(scenario())
    assert response.status_code == 200, response.content
    assert response.json()["code"] == "918273"
    assert delay < 1.0
