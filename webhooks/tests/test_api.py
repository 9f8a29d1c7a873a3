"""The webhooks API and the event log API's additions, through real HTTP requests to Django."""

from __future__ import annotations

import itertools

import pytest

from audit.models import AuditEntry
from tenants.access import Permission
from webhooks import delivery as sending
from webhooks.models import Delivery, Endpoint
from webhooks.tests.conftest import Scripted, make_endpoint, record, verify

pytestmark = pytest.mark.django_db


def test_it_creates_an_endpoint_showing_the_secret_once_and_audits_it(world, receiver):
    client = world.client(world.owner_key)
    response = client.post(
        "/api/v1/webhooks/",
        {"url": receiver.url("/hook?token=s3cr3t"), "event_types": ["message.*", "ingest.received"]},
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["secret"].startswith("whsec_")
    assert body["event_types"] == ["message.*", "ingest.received"]
    assert body["enabled"] is True
    shown = client.get(f"/api/v1/webhooks/{body['id']}/").json()
    assert "secret" not in shown and body["secret"] not in str(shown)
    assert body["secret"] not in str(client.get("/api/v1/webhooks/").json())
    entry = AuditEntry.objects.get(action="webhook.create")
    assert entry.resource_id == body["id"]
    assert "s3cr3t" not in str(entry.after) and body["secret"] not in str(entry.after)
    # The secret it showed is the one that signs.
    event = record(world)
    sending.delivery_send(Delivery.objects.get(event=event).pk)
    verify(body["secret"], receiver.wait_for(1)[0])


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"url": "ftp://example.com/"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": "http://user:pw@127.0.0.1/"}, "url"),
        ({"url": "http://does-not-exist.invalid/"}, "url"),
        ({"url": "http://127.0.0.1:99999/"}, "url"),
        ({"url": "http://127.0.0.1/", "event_types": ["Not A Type!"]}, "event_types"),
        ({"url": "http://127.0.0.1/", "domains": ["00000000-0000-0000-0000-000000000000"]}, "domains"),
        ({"url": "http://127.0.0.1/", "mailboxes": ["not-a-uuid"]}, "mailboxes"),
        ({"url": "http://127.0.0.1/", "event_types": "ingest.received"}, "event_types"),
        ({"url": ["x"]}, "url"),
        ({}, "url"),
    ],
)
def test_it_answers_400_to_invalid_endpoints(world, payload, field):
    response = world.client(world.owner_key).post("/api/v1/webhooks/", payload, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()["error"].get("details", {}), response.json()
    assert Endpoint.objects.count() == 0


def test_it_refuses_another_tenants_mailbox_as_a_filter(world, receiver):
    response = world.client(world.owner_key).post(
        "/api/v1/webhooks/", {"url": receiver.url(), "mailboxes": [str(world.outsider_mailbox.pk)]}, format="json"
    )
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("event_types", "unknown"),
    [
        (["ingest.recieved"], ["ingest.recieved"]),
        (["message.*", "nothing.*", "indexer.indexed", "Bogus.Type"], ["nothing.*", "bogus.type"]),
        (["message.deleted.*"], ["message.deleted.*"]),
        (["*"], ["*"]),
        (["Not A Type!"], ["not a type!"]),
    ],
)
@pytest.mark.parametrize("method", ["post", "patch"])
def test_it_refuses_event_types_outside_the_catalogue_naming_each(world, receiver, event_types, unknown, method):
    client = world.client(world.owner_key)
    if method == "post":
        response = client.post("/api/v1/webhooks/", {"url": receiver.url(), "event_types": event_types}, format="json")
    else:
        endpoint, _ = make_endpoint(world, receiver.url(), event_types=["indexer.indexed"])
        response = client.patch(f"/api/v1/webhooks/{endpoint.pk}/", {"event_types": event_types}, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], list(error["details"])) == ("unknown_event_type", ["event_types"])
    (problem,) = error["details"]["event_types"]
    assert problem.startswith(f"Unknown event types: {', '.join(repr(name) for name in unknown)}.")
    assert Endpoint.objects.exclude(event_types=["indexer.indexed"]).count() == 0


def test_it_takes_every_type_of_the_catalogue_and_every_prefix_of_its_namespaces(world, receiver):
    from audit.catalogue import EVENT_TYPES

    prefixes = sorted({f"{name.split('.')[0]}.*" for name in EVENT_TYPES})
    client = world.client(world.owner_key)
    for chunk in (sorted(EVENT_TYPES)[:25], sorted(EVENT_TYPES)[25:], prefixes):
        response = client.post("/api/v1/webhooks/", {"url": receiver.url(), "event_types": chunk}, format="json")
        assert response.status_code == 201, response.content
        assert response.json()["event_types"] == chunk
    assert "message.*" in prefixes and "webhook.*" in prefixes


@pytest.mark.parametrize(("field", "outsider"), [("mailboxes", "outsider_mailbox"), ("domains", "outsider_domain")])
@pytest.mark.parametrize("method", ["post", "patch"])
def test_it_names_the_api_field_of_a_filter_refused_by_the_service(world, receiver, field, outsider, method):
    """A well-formed id that is not the tenant's is refused under the field the client sent."""
    client = world.client(world.owner_key)
    payload = {field: [str(getattr(world, outsider).pk)]}
    if method == "post":
        response = client.post("/api/v1/webhooks/", {"url": receiver.url(), **payload}, format="json")
    else:
        endpoint, _ = make_endpoint(world, receiver.url())
        response = client.patch(f"/api/v1/webhooks/{endpoint.pk}/", payload, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], list(error["details"])) == ("validation_error", [field])
    assert error["details"][field] == [f"Not one of your {field}: {getattr(world, outsider).pk}."]


def test_it_updates_disables_and_reenables_with_an_audit_entry(world, receiver):
    endpoint, _ = make_endpoint(world, receiver.url())
    client = world.client(world.owner_key)
    response = client.patch(
        f"/api/v1/webhooks/{endpoint.pk}/", {"enabled": False, "description": "paused"}, format="json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["enabled"] is False and response.json()["disabled_reason"]
    response = client.patch(f"/api/v1/webhooks/{endpoint.pk}/", {"enabled": True}, format="json")
    assert response.json()["enabled"] is True and response.json()["disabled_reason"] == ""
    assert AuditEntry.objects.filter(action="webhook.update", resource_id=str(endpoint.pk)).count() == 2
    assert client.patch(f"/api/v1/webhooks/{endpoint.pk}/", {"url": "gopher://x"}, format="json").status_code == 400


def test_it_rotates_the_secret_with_an_overlap_then_only_the_new_one_signs(world, receiver, frozen_clock):
    endpoint, old_secret = make_endpoint(world, receiver.url())
    client = world.client(world.owner_key)
    response = client.post(f"/api/v1/webhooks/{endpoint.pk}/rotate-secret/", {}, format="json")
    assert response.status_code == 200, response.content
    new_secret = response.json()["secret"]
    assert new_secret != old_secret and new_secret.startswith("whsec_")

    sending.delivery_send(Delivery.objects.get(event=record(world)).pk)
    during = receiver.wait_for(1)[0]
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    verify(old_secret, during)
    verify(new_secret, during)

    frozen_clock.advance(24 * 3600 + 1)  # the default overlap is 24 h
    sending.delivery_send(Delivery.objects.get(event=record(world)).pk)
    after = receiver.wait_for(2)[1]
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    verify(new_secret, after)
    from standardwebhooks.webhooks import WebhookVerificationError

    with pytest.raises(WebhookVerificationError):
        verify(old_secret, after)


def test_it_lists_deliveries_by_state_and_retries_a_dead_one(world, receiver, frozen_clock):
    endpoint, secret = make_endpoint(world, receiver.url())
    receiver.respond(Scripted(410))
    event = record(world)
    delivery = Delivery.objects.get(event=event)
    sending.delivery_send(delivery.pk)
    client = world.client(world.owner_key)
    dead = client.get(f"/api/v1/webhooks/{endpoint.pk}/deliveries/?state=dead").json()["results"]
    assert [row["id"] for row in dead] == [str(delivery.pk)]
    assert dead[0]["event"] == event.public_id and dead[0]["last_status"] == 410
    assert client.get(f"/api/v1/webhooks/{endpoint.pk}/deliveries/?state=delivered").json()["results"] == []
    assert client.get(f"/api/v1/webhooks/{endpoint.pk}/deliveries/?state=bogus").status_code == 400
    detail = client.get(f"/api/v1/webhooks/{endpoint.pk}/deliveries/{delivery.pk}/").json()
    assert [a["status_code"] for a in detail["attempt_log"]] == [410]

    client.patch(f"/api/v1/webhooks/{endpoint.pk}/", {"enabled": True}, format="json")
    response = client.post(f"/api/v1/webhooks/{endpoint.pk}/deliveries/{delivery.pk}/retry/")
    assert response.status_code == 202, response.content
    assert response.json()["state"] == "pending"
    sending.delivery_send(delivery.pk)
    requests = receiver.wait_for(2)
    assert requests[1].headers["webhook-id"] == requests[0].headers["webhook-id"] == event.public_id
    verify(secret, requests[1])
    delivery.refresh_from_db()
    assert delivery.state == Delivery.State.DELIVERED and delivery.origin == Delivery.Origin.RETRY


def test_it_replays_matching_events_after_a_cursor_in_order_and_paced(world, receiver, frozen_clock):
    endpoint, secret = make_endpoint(world, receiver.url(), event_types=["ingest.*"])
    events = [record(world, "ingest.received", n=n) for n in range(5)]
    record(world, "domain.verified")  # not matching the filter
    Delivery.objects.update(state=Delivery.State.DELIVERED)
    client = world.client(world.owner_key)
    response = client.post(f"/api/v1/webhooks/{endpoint.pk}/replay/", {"after": events[0].public_id}, format="json")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["enqueued"] == 4
    assert (body["first_event"], body["last_event"]) == (events[1].public_id, events[4].public_id)
    replayed = list(Delivery.objects.filter(origin=Delivery.Origin.REPLAY).order_by("next_attempt_at"))
    assert [d.event_id for d in replayed] == [e.seq for e in events[1:]]
    gaps = [(b.next_attempt_at - a.next_attempt_at).total_seconds() for a, b in itertools.pairwise(replayed)]
    assert all(gap > 0 for gap in gaps)  # paced, in log order
    frozen_clock.advance(5)
    for delivery_id, claim in sending.deliveries_claim_due():
        sending.delivery_send(delivery_id, claim)
    received = receiver.wait_for(4)
    assert [r.headers["webhook-id"] for r in received] == [e.public_id for e in events[1:]]
    for request in received:
        verify(secret, request)
    # A time range works too; junk answers 400, never 500.
    assert client.post(f"/api/v1/webhooks/{endpoint.pk}/replay/", {"since": "2000-01-01T00:00:00Z"}).status_code == 202
    for junk in ({}, {"after": "evt_nope"}, {"after": "!!"}, {"since": "yesterday"}):
        assert client.post(f"/api/v1/webhooks/{endpoint.pk}/replay/", junk, format="json").status_code == 400


def test_it_answers_404_for_another_tenants_endpoint_and_delivery_on_every_route(world, receiver):
    endpoint, _ = make_endpoint(world, receiver.url())
    delivery = Delivery.objects.get(event=record(world))
    base = f"/api/v1/webhooks/{endpoint.pk}/"
    outsider = world.client(world.outsider_key)
    for method, path in [
        ("get", base),
        ("patch", base),
        ("delete", base),
        ("post", f"{base}rotate-secret/"),
        ("post", f"{base}replay/"),
        ("get", f"{base}deliveries/"),
        ("get", f"{base}deliveries/{delivery.pk}/"),
        ("post", f"{base}deliveries/{delivery.pk}/retry/"),
    ]:
        response = getattr(outsider, method)(path, {}, format="json")
        assert response.status_code == 404, (method, path, response.status_code)
    assert outsider.get("/api/v1/webhooks/").json()["results"] == []
    # Tenant A cannot reach its own delivery through another endpoint id either.
    other, _ = make_endpoint(world, receiver.url("/other"))
    owner = world.client(world.owner_key)
    assert owner.get(f"/api/v1/webhooks/{other.pk}/deliveries/{delivery.pk}/").status_code == 404
    Endpoint.objects.get(pk=endpoint.pk)  # untouched


def test_it_answers_403_to_a_key_without_webhooks_manage(world, receiver):
    endpoint, _ = make_endpoint(world, receiver.url())
    delivery = Delivery.objects.get(event=record(world))
    key = world.key([Permission.MESSAGES_READ, Permission.EVENTS_READ])
    client = world.client(key)
    base = f"/api/v1/webhooks/{endpoint.pk}/"
    for method, path in [
        ("get", "/api/v1/webhooks/"),
        ("post", "/api/v1/webhooks/"),
        ("get", base),
        ("patch", base),
        ("delete", base),
        ("post", f"{base}rotate-secret/"),
        ("post", f"{base}replay/"),
        ("get", f"{base}deliveries/"),
        ("get", f"{base}deliveries/{delivery.pk}/"),
        ("post", f"{base}deliveries/{delivery.pk}/retry/"),
    ]:
        response = getattr(client, method)(path, {}, format="json")
        assert response.status_code == 403, (method, path, response.status_code)


def test_it_hides_endpoints_from_a_key_scoped_to_a_mailbox(world, receiver):
    endpoint, _ = make_endpoint(world, receiver.url())
    key = world.key([Permission.WEBHOOKS_MANAGE], mailboxes=[world.mailbox])
    client = world.client(key)
    assert client.get("/api/v1/webhooks/").json()["results"] == []
    assert client.get(f"/api/v1/webhooks/{endpoint.pk}/").status_code == 404
    assert client.post("/api/v1/webhooks/", {"url": receiver.url()}, format="json").status_code == 403


def test_it_deletes_an_endpoint(world, receiver):
    endpoint, _ = make_endpoint(world, receiver.url())
    assert world.client(world.owner_key).delete(f"/api/v1/webhooks/{endpoint.pk}/").status_code == 204
    assert not Endpoint.objects.filter(pk=endpoint.pk).exists()
    assert AuditEntry.objects.filter(action="webhook.delete").exists()


def test_it_filters_the_event_log_by_mailbox_and_message_and_shows_deliveries(world, receiver):
    import uuid

    endpoint, _ = make_endpoint(world, receiver.url())
    message_id = uuid.uuid4()
    mine = record(world, "ingest.received")
    from audit.services import event_record

    about_message = event_record(
        tenant_id=world.tenant.pk, type="indexer.indexed", mailbox_id=world.sibling.pk, message_id=message_id
    )
    client = world.client(world.owner_key)
    ids = [e["id"] for e in client.get(f"/api/v1/events/?mailbox={world.mailbox.pk}").json()["results"]]
    assert ids == [mine.public_id]
    ids = [e["id"] for e in client.get(f"/api/v1/events/?message={message_id}").json()["results"]]
    assert ids == [about_message.public_id]
    assert client.get("/api/v1/events/?mailbox=nope").status_code == 400
    assert client.get("/api/v1/events/?message=nope").status_code == 400

    detail = client.get(f"/api/v1/events/{mine.public_id}/").json()
    assert detail["id"] == mine.public_id
    assert [(d["endpoint"], d["state"]) for d in detail["deliveries"]] == [(str(endpoint.pk), "pending")]
    # A key that may read events but not manage webhooks sees the event without deliveries.
    reader = world.client(world.key([Permission.EVENTS_READ]))
    assert "deliveries" not in reader.get(f"/api/v1/events/{mine.public_id}/").json()


def test_the_schema_names_unknown_event_type_on_create_and_update(client):
    schema = client.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    for path, method in (("/api/v1/webhooks/", "post"), ("/api/v1/webhooks/{id}/", "patch")):
        assert "unknown_event_type" in schema["paths"][path][method]["responses"]["400"]["description"]
