"""Direct-to-MX delivery (the test DNS server names the sink as the MX), retries, bounces at
RCPT, suppression, the SSRF rule, and the refusals of the send API; the delivery service runs
in this process against the real sink and DNS server."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from audit.models import Event
from outbound import delivery
from outbound.models import Recipient, Suppression
from outbound.tests.helpers import dkim_key_publish, dkim_verifies

SEND = {"from": "inbox@acme.example.test", "to": ["carol@remote.example.org"], "subject": "Hello", "text": "Hi."}


@pytest.fixture
def direct(settings: Any, dns_zone: Any, sink: Any) -> Any:
    settings.OUTBOUND_URL = ""
    settings.OUTBOUND_MX_PORT = sink_port(sink)
    settings.OUTBOUND_ALLOW_PRIVATE = True
    settings.OUTBOUND_RETRY_SCHEDULE = [60]
    dns_zone.set("remote.example.org", "MX", [(10, "mx.remote.example.org.")])
    dns_zone.set("mx.remote.example.org", "A", ["127.0.0.1"])
    return sink


def sink_port(sink: Any) -> int:
    from outbound.tests.conftest import SINK

    return int(SINK["port"])


def _send(world: Any, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = world.client(world.owner_key).post("/api/v1/messages/send", body or SEND, format="json")
    assert response.status_code == 202, response.content
    return dict(response.json())


def test_it_delivers_to_the_mx_signed_and_retries_a_451_until_it_is_taken(world: Any, direct: Any, dns_zone: Any):
    key = dkim_key_publish(world.client(world.owner_key), dns_zone, world.domain, "ed25519")
    direct.defer_once.add("carol@remote.example.org")
    sent = _send(world)
    assert delivery.message_deliver(sent["id"]) == {"deferred": 1}
    recipient = Recipient.objects.get(message_id=sent["id"])
    assert recipient.last_response.startswith("451 4.3.0") and recipient.remote_host == "mx.remote.example.org"
    assert recipient.next_attempt_at > timezone.now() + timedelta(seconds=50)
    assert delivery.message_deliver(sent["id"]) == {}  # not due yet: nothing is sent
    Recipient.objects.filter(pk=recipient.pk).update(next_attempt_at=timezone.now())
    assert delivery.message_deliver(sent["id"]) == {"delivered": 1}
    (item,) = direct.received
    assert item.rcpt == "carol@remote.example.org" and dkim_verifies(item.content, dns_zone)
    assert f"s={key['selector']};" in item.content.decode().replace(" ", "").replace("\r\n\t", "")
    types = list(Event.objects.filter(tenant=world.tenant, type__startswith="outbound.").values_list("type", flat=True))
    assert sorted(types) == ["outbound.deferred", "outbound.delivered", "outbound.queued"]


def test_it_bounces_a_550_suppresses_the_address_and_sends_nothing_to_it_again(world: Any, direct: Any):
    direct.refuse.add("carol@remote.example.org")
    sent = _send(world)
    assert delivery.message_deliver(sent["id"]) == {"bounced": 1}
    recipient = Recipient.objects.get(message_id=sent["id"])
    assert recipient.last_response.startswith("550 5.1.1")
    assert Suppression.objects.get(tenant=world.tenant).address == "carol@remote.example.org"
    again = _send(world, {**SEND, "to": ["Carol@remote.example.org", "dave@remote.example.org"]})
    states = {r["address"]: r["state"] for r in again["recipients"]}
    assert states == {"Carol@remote.example.org": "suppressed", "dave@remote.example.org": "queued"}
    # The 202 is built without the serializer: it must say exactly what reading the message says.
    detail = world.client(world.owner_key).get(f"/api/v1/outbound-messages/{again['id']}/")
    assert detail.json() == again
    assert delivery.message_deliver(again["id"]) == {"delivered": 1}
    assert [item.rcpt for item in direct.received] == ["dave@remote.example.org"]
    listed = world.client(world.owner_key).get("/api/v1/suppressions/").json()["results"]
    assert [(s["address"], s["reason"]) for s in listed] == [("carol@remote.example.org", "hard_bounce")]
    removed = world.client(world.owner_key).delete(f"/api/v1/suppressions/{listed[0]['id']}/")
    assert removed.status_code == 204 and not Suppression.objects.exists()


def test_it_refuses_an_mx_on_a_private_address_and_gives_up_in_the_end(world: Any, direct: Any, settings: Any):
    settings.OUTBOUND_ALLOW_PRIVATE = False
    sent = _send(world)
    assert delivery.message_deliver(sent["id"]) == {"deferred": 1}
    recipient = Recipient.objects.get(message_id=sent["id"])
    assert "no public address (127.0.0.1)" in recipient.last_response
    assert direct.received == []
    Recipient.objects.filter(pk=recipient.pk).update(next_attempt_at=timezone.now(), give_up_at=timezone.now())
    assert delivery.message_deliver(sent["id"]) == {"bounced": 1}
    assert Recipient.objects.get(pk=recipient.pk).last_response.startswith("gave up after 2 attempts")
    assert not Suppression.objects.exists()  # a 4xx that ran out is not a hard bounce


def test_it_refuses_unverified_domains_foreign_senders_missing_permission_and_spent_quota(world: Any, settings: Any):
    from tenants.tests.factories import DomainFactory

    DomainFactory(tenant=world.tenant, name="pending.example.test", state="pending")
    client = world.client(world.owner_key)
    cases = [
        ({**SEND, "from": "a@pending.example.test"}, 403, "domain_not_verified"),
        ({**SEND, "from": "nobody@acme.example.test"}, 403, "sender_not_allowed"),
        ({**SEND, "from": "theirs@outsider.example.test"}, 403, "domain_not_verified"),
        ({**SEND, "to": ["not an address"]}, 400, "validation_error"),
        ({**SEND, "to": []}, 400, "no_recipients"),
    ]
    for body, code, error in cases:
        response = client.post("/api/v1/messages/send", body, format="json")
        assert (response.status_code, response.json()["error"]["code"]) == (code, error), response.content
    lacking = world.client(world.key(["messages:read"]))
    response = lacking.post("/api/v1/messages/send", SEND, format="json")
    assert (response.status_code, response.json()["error"]["code"]) == (403, "missing_permission")
    settings.OUTBOUND_DAILY_QUOTA = 2
    _send(world, {**SEND, "to": ["a@remote.example.org", "b@remote.example.org"]})
    response = client.post("/api/v1/messages/send", SEND, format="json")
    assert (response.status_code, response.json()["error"]["code"]) == (429, "quota_exceeded")
    assert "daily quota of 2" in response.json()["error"]["message"]
    assert 0 < int(response["Retry-After"]) <= 86400  # until midnight UTC
    settings.OUTBOUND_DAILY_QUOTA, settings.OUTBOUND_RATE_PER_TENANT = 100, 1
    response = client.post("/api/v1/messages/send", SEND, format="json")
    assert (response.status_code, response.json()["error"]["code"]) == (429, "rate_limited")
    assert 0 < int(response["Retry-After"]) <= 60  # until the next minute's window
    assert Recipient.objects.count() == 2


def test_a_domain_that_allows_any_local_part_sends_from_any_address_but_only_by_a_key_holding_it(world: Any):
    client = world.client(world.owner_key)
    body = {**SEND, "from": "noreply@acme.example.test"}
    response = client.post("/api/v1/messages/send", body, format="json")
    assert (response.status_code, response.json()["error"]["code"]) == (403, "sender_not_allowed")
    url = f"/api/v1/domains/{world.domain.pk}/sending"
    assert client.get(url).json() == {"any_local_part": False}
    reader = world.client(world.key(["messages:send"]))
    assert reader.put(url, {"any_local_part": True}, format="json").status_code == 403
    assert client.put(url, {"any_local_part": True}, format="json").json() == {"any_local_part": True}
    sent = client.post("/api/v1/messages/send", body, format="json")
    assert sent.status_code == 202, sent.content
    assert sent.json()["from_address"] == "noreply@acme.example.test" and sent.json()["mailbox"] is None
    # A key granted only a mailbox of the domain still sends only as that mailbox.
    scoped = world.client(world.key(["messages:send"], mailboxes=[world.mailbox]))
    response = scoped.post("/api/v1/messages/send", body, format="json")
    assert (response.status_code, response.json()["error"]["code"]) == (403, "sender_not_allowed")
    assert scoped.post("/api/v1/messages/send", SEND, format="json").status_code == 202
