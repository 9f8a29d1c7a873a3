"""SSRF matrix with WEBHOOK_ALLOW_PRIVATE off: refused at creation (400) and at delivery, and a
listener on loopback proves that nothing arrived."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.test import override_settings

from webhooks import delivery as sending
from webhooks import signing, transport
from webhooks.models import Attempt, Delivery, Endpoint
from webhooks.tests.conftest import Receiver, Scripted, loopback_receivers, make_endpoint, record

pytestmark = pytest.mark.django_db

HOSTS = [
    "127.0.0.1",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",
    "169.254.169.254",
    "0.0.0.0",
    "[::1]",
    "[fc00::1]",
    "[fe80::1]",
    "[::ffff:127.0.0.1]",
    "[64:ff9b::7f00:1]",
    "[2002:7f00:1::]",
    "[::7f00:1]",  # IPv4-compatible
    "[2001:0:4136:e378:8000:63bf:80ff:fffe]",  # Teredo, client 127.0.0.1
    "localhost",  # a host name resolving to loopback
]


@pytest.fixture
def listeners() -> Iterator[list[Receiver]]:
    yield from loopback_receivers()


@pytest.fixture
def strict(listeners: list[Receiver]) -> Iterator[None]:
    # Plain http and the listeners' ports are allowed, so only the address rule can refuse.
    with override_settings(
        WEBHOOK_ALLOW_PRIVATE=False, WEBHOOK_ALLOW_HTTP=True, WEBHOOK_EXTRA_PORTS=[s.port for s in listeners]
    ):
        yield


@pytest.mark.parametrize("host", HOSTS)
def test_it_refuses_a_non_public_address_at_creation(world, listeners, strict, host):
    for listener in listeners:
        url = f"http://{host}:{listener.port}/hook"
        response = world.client(world.owner_key).post("/api/v1/webhooks/", {"url": url}, format="json")
        assert response.status_code == 400, (url, response.content)
        assert response.json()["error"]["details"]["url"], response.json()
    assert Endpoint.objects.count() == 0
    assert all(listener.received == [] for listener in listeners)


@pytest.mark.parametrize("host", HOSTS)
def test_it_refuses_a_non_public_address_at_delivery(world, listeners, strict, host):
    # As if the endpoint had passed validation and DNS changed since: stored as is.
    for listener in listeners:
        Endpoint.objects.create(
            tenant=world.tenant,
            url=f"http://{host}:{listener.port}/hook",
            secret_encrypted=signing.secret_encrypt(signing.secret_generate()),
        )
    record(world)
    deliveries = list(Delivery.objects.all())
    assert len(deliveries) == len(listeners)
    for delivery in deliveries:
        assert sending.delivery_send(delivery.pk).state == Delivery.State.PENDING
    attempts = list(Attempt.objects.all())
    assert len(attempts) == len(listeners)
    assert all(a.error.startswith("refused:") and a.status_code is None for a in attempts), attempts
    assert all(listener.received == [] for listener in listeners)


def test_it_does_reach_the_listener_when_private_addresses_are_allowed(world, listeners):
    """The control for the matrix: the same listener is reachable, so silence above means refusal."""
    with override_settings(WEBHOOK_ALLOW_PRIVATE=True):
        make_endpoint(world, listeners[0].url(host="localhost"))
        sending.delivery_send(Delivery.objects.get(event=record(world)).pk)
    assert len(listeners[0].wait_for(1)) == 1


def test_it_does_not_follow_a_redirect_to_loopback(world, listeners):
    with override_settings(WEBHOOK_ALLOW_PRIVATE=True):
        redirector = Receiver()
        try:
            redirector.respond(Scripted(307, headers={"Location": listeners[0].url("/internal")}))
            make_endpoint(world, redirector.url())
            delivery = sending.delivery_send(Delivery.objects.get(event=record(world)).pk)
            assert delivery.state == Delivery.State.PENDING
            assert len(redirector.wait_for(1)) == 1
        finally:
            redirector.close()
    assert listeners[0].received == []


@override_settings(WEBHOOK_ALLOW_PRIVATE=False, WEBHOOK_ALLOW_HTTP=False, WEBHOOK_EXTRA_PORTS=[])
def test_it_allows_public_addresses_on_80_and_443_only_over_https():
    for address in ("93.184.216.34", "2606:4700:4700::1111", "2002:5db8:d822::1", "64:ff9b::5db8:d822"):
        assert transport.address_allowed(address), address
    for address in ("64:ff9b:1::1", "ff02::1", "224.0.0.1", "255.255.255.255", "198.18.0.1", "2001:db8::1"):
        assert not transport.address_allowed(address), address
    assert transport.url_parse("https://93.184.216.34/x?y=1") == ("https", "93.184.216.34", 443, "/x?y=1")
    with pytest.raises(transport.UrlRefused, match="https"):
        transport.url_parse("http://93.184.216.34/")
    with pytest.raises(transport.UrlRefused, match="Port 8443"):
        transport.url_parse("https://93.184.216.34:8443/")
    with override_settings(WEBHOOK_EXTRA_PORTS=[8443]):
        assert transport.url_parse("https://93.184.216.34:8443/")[2] == 8443


def test_it_pins_the_resolved_address_and_keeps_the_host_name(world, listeners):
    """A host name is resolved once and the request carries it as Host, sent to that address."""
    with override_settings(WEBHOOK_ALLOW_PRIVATE=True):
        target = transport.url_resolve(listeners[0].url(host="localhost"))
        assert target.address in {"127.0.0.1", "::1"}
        make_endpoint(world, listeners[0].url(host="localhost"))
        sending.delivery_send(Delivery.objects.get(event=record(world)).pk)
    (request,) = listeners[0].wait_for(1)
    assert request.headers["host"] == f"localhost:{listeners[0].port}"
