"""The whole mail path with real processes: smtplib -> runsmtp -> Celery worker -> uvicorn waiters.

A waiter (``/messages/wait/``) and a code waiter (``/codes/latest/?wait=``) start before the
mail is sent over SMTP; runsmtp spools and drains it, a real Celery worker (Redis broker)
parses and indexes it, and the index transaction's NOTIFY wakes both waiters in uvicorn.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from mailboxes.models import Message

pytestmark = [pytest.mark.slow]

MAIL = (
    b"From: Shop <no-reply@shop.example>\r\nTo: inbox@acme.example.test\r\nSubject: Confirm your account\r\n"
    b"Message-ID: <e2e-1@shop.example>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    b"Your verification code is 482913.\r\nOr open https://shop.example/confirm?t=abc\r\n"
)


async def _get(url: str, path: str, key: str) -> tuple[int, dict[str, Any], float]:
    """A bare HTTP/1.0 GET; returns the status, the JSON body and when it arrived (epoch seconds)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    arrived = time.time()
    writer.close()
    status, _, body = response.partition(b"\r\n\r\n")
    return int(status.split()[1]), json.loads(body), arrived


async def _until_waiting(url: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while True:
            lines = (await client.get("/metrics")).text.splitlines()
            waiting = [float(line.split()[1]) for line in lines if line.startswith("mailboxes_waiters ")]
            if waiting and waiting[0] >= count:
                return
            assert time.monotonic() < deadline, f"not {count} waiters after {timeout} s"
            await asyncio.sleep(0.2)


def test_it_answers_waiters_within_a_second_of_indexing_mail_sent_over_smtp(
    world: Any, runsmtp: Any, celery_worker: Any, web_server: str
) -> None:
    smtp = runsmtp()
    smtp.start()
    key = world.owner_key
    since = datetime.fromtimestamp(time.time() - 1, tz=UTC).isoformat()

    async def scenario() -> tuple[tuple[int, dict[str, Any], float], tuple[int, dict[str, Any], float]]:
        mailbox = str(world.mailbox.pk)
        message_waiter = asyncio.create_task(
            _get(web_server, "/api/v1/messages/wait/?" + urlencode({"mailbox": mailbox, "after": since}), key)
        )
        code_waiter = asyncio.create_task(
            _get(web_server, f"/api/v1/mailboxes/{mailbox}/codes/latest/?" + urlencode({"wait": 60}), key)
        )
        await _until_waiting(web_server, 2)
        assert not message_waiter.done() and not code_waiter.done()

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", smtp.port, timeout=10) as client:
                assert client.sendmail("no-reply@shop.example", ["inbox@acme.example.test"], MAIL) == {}

        await asyncio.to_thread(send)
        return await asyncio.wait_for(message_waiter, 60), await asyncio.wait_for(code_waiter, 60)

    (status, body, message_arrived), (code_status, code_body, code_arrived) = asyncio.run(scenario())
    assert status == 200, body
    assert code_status == 200, code_body
    message = Message.objects.get(mailbox=world.mailbox)
    assert message.state == Message.State.INDEXED and message.indexed_at is not None
    assert body["id"] == str(message.pk) and body["subject"] == "Confirm your account"
    assert body["codes"] == ["482913"]
    assert code_body["code"] == "482913" and code_body["message"] == str(message.pk)
    assert {"url": "https://shop.example/confirm?t=abc"}.items() <= code_body["links"][0].items()
    # indexed_at is taken inside the index transaction, just before it commits and notifies.
    delays = [arrived - message.indexed_at.timestamp() for arrived in (message_arrived, code_arrived)]
    print(f"answered {max(delays):.3f} s after indexing (SMTP to answer: {message.trace_id})")
    assert max(delays) < 1.5  # about a second, with room for a busy 2-core test machine
