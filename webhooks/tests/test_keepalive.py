"""Kept-alive connections to webhook receivers (mailplatform/transport.py ConnectionPool):
reused for the same checked address only, never for another; one the receiver closed is not
used again, and a request that met a connection closed under it goes once on a new one."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from mailplatform import transport as shared
from webhooks import transport
from webhooks.tests.conftest import Receiver, Scripted


@pytest.fixture
def keep_alive_receiver() -> Iterator[Receiver]:
    server = Receiver(keep_alive=True)
    yield server
    server.close()
    transport.POOL.clear()


def _post(target: shared.Target, body: bytes) -> shared.Response:
    return transport.post(target, body, {"content-type": "application/json"}, timeout=5)


def test_it_sends_one_request_after_another_over_one_connection(keep_alive_receiver: Receiver) -> None:
    target = transport.url_resolve(keep_alive_receiver.url())

    answers = [_post(target, f'{{"n": {number}}}'.encode()) for number in range(5)]

    assert [answer.status for answer in answers] == [200] * 5
    assert [request.json["n"] for request in keep_alive_receiver.wait_for(5)] == [0, 1, 2, 3, 4]
    assert keep_alive_receiver.connections == 1


def test_it_never_reuses_a_connection_for_another_pinned_address(keep_alive_receiver: Receiver) -> None:
    target = transport.url_resolve(keep_alive_receiver.url())
    assert _post(target, b"{}").status == 200  # a connection to 127.0.0.1 now waits in the pool

    # The same host name and port, checked again, now pinned elsewhere (the receiver does not
    # listen there): the kept connection must not carry the request.
    elsewhere = dataclasses.replace(target, address="127.0.0.2")
    with pytest.raises(shared.TransportError):
        _post(elsewhere, b"{}")

    assert len(keep_alive_receiver.received) == 1
    assert _post(target, b"{}").status == 200
    assert keep_alive_receiver.connections == 1


def test_it_opens_a_new_connection_once_the_receiver_closed_the_kept_one(keep_alive_receiver: Receiver) -> None:
    target = transport.url_resolve(keep_alive_receiver.url())
    keep_alive_receiver.respond(Scripted(hang_up=True))
    assert _post(target, b"{}").status == 200
    keep_alive_receiver.wait_for(1)

    assert _post(target, b"{}").status == 200

    assert len(keep_alive_receiver.wait_for(2)) == 2
    assert keep_alive_receiver.connections == 2


def test_a_request_that_meets_a_connection_closed_under_it_goes_once_on_a_new_one(
    keep_alive_receiver: Receiver, monkeypatch: Any
) -> None:
    target = transport.url_resolve(keep_alive_receiver.url())
    keep_alive_receiver.respond(Scripted(hang_up=True))
    assert _post(target, b'{"n": 1}').status == 200
    keep_alive_receiver.wait_for(1)
    # The race with a receiver's idle timeout: the close is not seen before the request is sent.
    monkeypatch.setattr(shared, "_readable", lambda sock: False)

    assert _post(target, b'{"n": 2}').status == 200

    assert [request.json["n"] for request in keep_alive_receiver.wait_for(2)] == [1, 2]
    assert keep_alive_receiver.connections == 2


def test_a_response_cut_at_the_body_limit_closes_its_connection(keep_alive_receiver: Receiver) -> None:
    target = transport.url_resolve(keep_alive_receiver.url())
    keep_alive_receiver.respond(Scripted(body=b"x" * (transport.RESPONSE_BODY_LIMIT * 4)))

    assert len(_post(target, b"{}").body) == transport.RESPONSE_BODY_LIMIT
    assert _post(target, b"{}").status == 200

    assert keep_alive_receiver.connections == 2
