import pytest

from audit.models import AuditEntry, Event
from mailboxes.models import Mailbox


def test_it_creates_a_mailbox_from_an_address(world):
    response = world.client(world.owner_key).post(
        "/api/v1/mailboxes/", {"address": "Sales@ACME.example.test", "name": "Sales"}, format="json"
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["address"] == "sales@acme.example.test" and body["domain"] == str(world.domain.pk)
    event = Event.objects.get(type="mailbox.created", mailbox_id=body["id"])
    assert event.as_json()["data"]["address"] == "sales@acme.example.test"
    assert AuditEntry.objects.filter(action="mailbox.create", resource_id=body["id"]).count() == 1


def test_it_creates_a_random_address_when_no_local_part_is_given(world):
    client = world.client(world.owner_key)
    first = client.post("/api/v1/mailboxes/", {"domain": str(world.domain.pk)}, format="json").json()
    second = client.post("/api/v1/mailboxes/", {"domain": str(world.domain.pk)}, format="json").json()
    local = first["local_part"]
    assert len(local) >= 16 and first["address"] != second["address"]


def test_it_treats_addresses_case_insensitively(world):
    response = world.client(world.owner_key).post("/api/v1/mailboxes/", {"address": "INBOX@acme.example.test"})
    assert response.status_code == 400
    assert "local_part" in response.json()["error"]["details"]


@pytest.mark.parametrize("local_part", ["box+tag", "a..b", ".lead", "trail.", "with space", "x" * 65, "postmaster"])
def test_it_refuses_local_parts_that_cannot_receive_mail(world, local_part):
    response = world.client(world.owner_key).post(
        "/api/v1/mailboxes/", {"domain": str(world.domain.pk), "local_part": local_part}, format="json"
    )
    assert response.status_code == 400, response.content


def test_it_refuses_a_domain_of_another_tenant(world):
    response = world.client(world.outsider_key).post(
        "/api/v1/mailboxes/", {"domain": str(world.domain.pk), "local_part": "mine"}, format="json"
    )
    assert response.status_code == 400
    assert not Mailbox.objects.filter(local_part="mine").exists()


def test_it_allows_one_catch_all_per_domain(world):
    client = world.client(world.owner_key)
    payload = {"domain": str(world.domain.pk), "is_catch_all": True}
    assert client.post("/api/v1/mailboxes/", {**payload, "local_part": "all"}, format="json").status_code == 201
    second = client.post("/api/v1/mailboxes/", {**payload, "local_part": "all2"}, format="json")
    assert second.status_code == 400
    assert "is_catch_all" in second.json()["error"]["details"]


def test_it_updates_and_deletes_a_mailbox_with_events(world):
    client = world.client(world.owner_key)
    url = f"/api/v1/mailboxes/{world.sibling.pk}/"
    response = client.patch(url, {"name": "Renamed", "retention_days": 7}, format="json")
    assert response.status_code == 200 and response.json()["retention_days"] == 7
    assert client.delete(url).status_code == 204
    assert not Mailbox.objects.filter(pk=world.sibling.pk).exists()
    assert Event.objects.filter(type="mailbox.deleted", mailbox_id=world.sibling.pk).exists()


def test_it_filters_mailboxes_by_domain(world):
    client = world.client(world.owner_key)
    assert len(client.get(f"/api/v1/mailboxes/?domain={world.domain.pk}").json()["results"]) == 2
    assert client.get(f"/api/v1/mailboxes/?domain={world.outsider_domain.pk}").json()["results"] == []
    assert client.get("/api/v1/mailboxes/?domain=nope").status_code == 400


def test_it_pages_mailboxes_with_a_cursor(world):
    client = world.client(world.owner_key)
    for index in range(5):
        client.post("/api/v1/mailboxes/", {"address": f"p{index}@acme.example.test"}, format="json")
    seen, url = [], "/api/v1/mailboxes/?limit=3"
    while url:
        page = client.get(url).json()
        seen += [row["address"] for row in page["results"]]
        url = page["next"]
    assert len(seen) == 7 and len(set(seen)) == 7


def test_it_lets_a_domain_scoped_key_create_only_on_its_domain(world):
    from tenants.models import Domain

    other = Domain.objects.create(tenant=world.tenant, name="other.example.test")
    client = world.client(world.key(["mailboxes:manage"], domains=[world.domain]))
    assert client.post("/api/v1/mailboxes/", {"address": "ok@acme.example.test"}, format="json").status_code == 201
    refused = client.post("/api/v1/mailboxes/", {"domain": str(other.pk)}, format="json")
    assert refused.status_code == 400


def test_it_deletes_a_mailbox_through_soft_delete_and_purge_leaving_no_blob_behind(world, monkeypatch):
    from mailboxes import blobs, retention
    from mailboxes.models import Attachment, Message
    from mailboxes.tests.helpers import fixture_bytes, message_deliver, simple_message

    own = message_deliver(world.mailbox, fixture_bytes("cast_message.eml"))  # with an attachment
    shared_raw = simple_message("Sent to both")
    doomed_copy = message_deliver(world.mailbox, shared_raw)
    kept_copy = message_deliver(world.sibling, shared_raw, received_at=doomed_copy.received_at)
    attachment_keys = list(Attachment.objects.filter(message=own).values_list("storage_key", flat=True))
    assert attachment_keys and doomed_copy.storage_key == kept_copy.storage_key
    client = world.client(world.owner_key)

    assert client.delete(f"/api/v1/mailboxes/{world.mailbox.pk}/").status_code == 204
    assert not Mailbox.objects.filter(pk=world.mailbox.pk).exists()
    assert client.get(f"/api/v1/messages/{own.pk}/").status_code == 404
    assert Event.objects.get(type="mailbox.deleted", mailbox_id=world.mailbox.pk).data["messages"] == 2
    hidden = Message.objects.filter(pk__in=[own.pk, doomed_copy.pk])
    assert {(row.mailbox_id, row.state) for row in hidden} == {(None, Message.State.DELETED)}
    assert blobs.blob_exists(own.storage_key)  # hidden at once, removed by the sweeper

    monkeypatch.setattr(retention, "RECENT_BLOB", retention.timedelta(0))
    assert retention.messages_purge() == 2
    assert not blobs.blob_exists(own.storage_key)
    assert not any(blobs.blob_exists(key) for key in attachment_keys)
    assert blobs.blob_exists(kept_copy.storage_key)  # still the sibling's
    assert client.get(f"/api/v1/messages/{kept_copy.pk}/raw/").status_code == 200
    assert all(row.purged_at is not None for row in hidden.all())
