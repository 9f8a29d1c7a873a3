import threading

import pytest
from django.db import connection, connections, transaction

from audit.models import Event
from audit.services import event_record


def _record(world, type_="mailbox.created", mailbox=None):
    mailbox = mailbox or world.mailbox
    return event_record(tenant_id=world.tenant.pk, type=type_, mailbox_id=mailbox.pk, domain_id=world.domain.pk)


def test_it_lists_events_in_the_contract_shape(world):
    event = _record(world)
    response = world.client(world.owner_key).get("/api/v1/events/")
    assert response.status_code == 200
    [row] = [row for row in response.json()["results"] if row["id"] == event.public_id]
    assert set(row) == {"id", "type", "timestamp", "tenant", "trace_id", "data"}
    assert row["tenant"] == str(world.tenant.pk) and row["timestamp"].endswith("Z")
    assert row["data"]["mailbox"] == str(world.mailbox.pk)


def test_it_pages_through_the_log_in_order_and_resumes_from_a_cursor(world):
    created = [_record(world, "test.step").public_id for _ in range(7)]
    client = world.client(world.owner_key)
    seen, url = [], "/api/v1/events/?type=test.step&limit=3"
    while url:
        page = client.get(url).json()
        seen += [row["id"] for row in page["results"]]
        url, cursor = page["next"], page["next_cursor"]
    assert seen == created
    # Nothing new yet: an empty page that keeps the cursor; then the new event appears.
    empty = client.get(f"/api/v1/events/?type=test.step&cursor={cursor}").json()
    assert empty["results"] == [] and empty["next_cursor"] == cursor
    later = _record(world, "test.step")
    assert [row["id"] for row in client.get(f"/api/v1/events/?cursor={cursor}").json()["results"]] == [later.public_id]


def test_it_starts_after_an_event_id(world):
    first, second = _record(world, "test.a"), _record(world, "test.b")
    rows = world.client(world.owner_key).get(f"/api/v1/events/?after={first.public_id}").json()["results"]
    assert [row["id"] for row in rows] == [second.public_id]


def test_it_filters_by_exact_type_and_prefix(world):
    _record(world, "message.quarantined")
    _record(world, "message.deleted")
    _record(world, "domain.verified")
    client = world.client(world.owner_key)
    prefixed = {row["type"] for row in client.get("/api/v1/events/?type=message.*").json()["results"]}
    assert prefixed == {"message.quarantined", "message.deleted"}
    both = {row["type"] for row in client.get("/api/v1/events/?type=domain.verified,message.deleted").json()["results"]}
    assert both == {"domain.verified", "message.deleted"}


@pytest.mark.parametrize(
    "query", ["cursor=%%%", "cursor=bm90IGEgY3Vyc29y", "after=evt_nope", "after=%00", "type=%00", "limit=ten"]
)
def test_it_answers_400_to_bad_parameters(world, query):
    response = world.client(world.owner_key).get(f"/api/v1/events/?{query}")
    assert response.status_code == 400
    # A bad cursor has the code every list answers for it.
    expected = "invalid_cursor" if query.startswith("cursor=") else "validation_error"
    assert response.json()["error"]["code"] == expected


def test_it_answers_400_for_an_event_of_another_tenant_as_the_starting_point(world):
    theirs = event_record(tenant_id=world.outsider_tenant.pk, type="test.theirs")
    response = world.client(world.owner_key).get(f"/api/v1/events/?after={theirs.public_id}")
    assert response.status_code == 400


def test_it_reads_one_event(world):
    event = _record(world)
    client = world.client(world.owner_key)
    assert client.get(f"/api/v1/events/{event.public_id}/").json()["id"] == event.public_id
    assert world.client(world.outsider_key).get(f"/api/v1/events/{event.public_id}/").status_code == 404


def test_it_shows_a_scoped_key_only_its_mailboxes_events(world):
    mine, theirs = _record(world), _record(world, mailbox=world.sibling)
    tenant_wide = event_record(tenant_id=world.tenant.pk, type="tenant.thing")
    client = world.client(world.key(["events:read"], mailboxes=[world.mailbox]))
    ids = {row["id"] for row in client.get("/api/v1/events/").json()["results"]}
    assert mine.public_id in ids
    assert theirs.public_id not in ids and tenant_wide.public_id not in ids


def test_it_never_puts_secrets_into_event_data(world):
    event = event_record(
        tenant_id=world.tenant.pk, type="test.secretive", data={"token": "t0ps3cret", "nested": {"password": "pw"}}
    )
    assert event.data == {"nested": {}}


@pytest.mark.django_db(transaction=True)
def test_it_holds_back_events_until_every_older_transaction_has_committed(world):
    """A reader following the cursor never steps past an event that commits later."""
    if connection.vendor != "postgresql":
        pytest.fail("this guarantee is PostgreSQL's; the suite runs on PostgreSQL")
    client = world.client(world.owner_key)
    written, release, done = threading.Event(), threading.Event(), threading.Event()
    slow_ids: list[str] = []

    def slow_writer() -> None:
        try:
            with transaction.atomic():
                slow_ids.append(_record(world, "test.slow").public_id)
                written.set()
                release.wait(10)
        finally:
            connections.close_all()
            done.set()

    thread = threading.Thread(target=slow_writer)
    thread.start()
    assert written.wait(10)
    fast = _record(world, "test.fast")  # commits first, though its transaction began later
    page = client.get("/api/v1/events/?type=test.slow,test.fast").json()
    assert page["results"] == []  # the fast event waits behind the open transaction
    release.set()
    assert done.wait(10)
    thread.join()
    rows = client.get("/api/v1/events/?type=test.slow,test.fast").json()["results"]
    assert [row["id"] for row in rows] == [slow_ids[0], fast.public_id]
    assert Event.objects.count() >= 2
