import pytest

from audit.models import AuditEntry
from mailboxes.tests.factories import MailboxFactory
from tenants.models import Domain


def test_it_adds_a_domain_normalized_and_pending(world):
    response = world.client(world.owner_key).post(
        "/api/v1/domains/", {"name": "  Mail.Bücher.Example. ", "recipient_policy": "drop"}, format="json"
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["name"] == "mail.xn--bcher-kva.example"
    assert body["state"] == "pending" and body["recipient_policy"] == "drop"
    txt = body["dns_records"][0]
    assert txt["type"] == "TXT" and txt["value"].startswith("mailplatform-verification=")
    assert AuditEntry.objects.filter(action="domain.create", resource_id=body["id"]).count() == 1


@pytest.mark.parametrize("name", ["", "localhost", "-bad.example", "a..b", "x" * 64 + ".example", "10.0.0.1", "a b.c"])
def test_it_refuses_names_that_are_not_domains(world, name):
    response = world.client(world.owner_key).post("/api/v1/domains/", {"name": name}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "validation_error"


@pytest.mark.parametrize(
    "name", ["xn--zz.com", "XN--ZZ.com", "xn--a.example.test", "mail.xn--ls8h.example.test", "☃.example.test"]
)
def test_it_refuses_names_that_are_not_valid_idna(world, name):
    response = world.client(world.owner_key).post("/api/v1/domains/", {"name": name}, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert "not a valid internationalized domain name (IDNA)" in error["details"]["name"][0]
    assert not Domain.objects.filter(tenant=world.tenant).exclude(pk=world.domain.pk).exists()


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("bücher.example.test", "xn--bcher-kva.example.test"),
        ("XN--BCHER-KVA.example.test", "xn--bcher-kva.example.test"),
        ("faß.example.test", "xn--fa-hia.example.test"),  # IDNA 2008: not fass.example.test
        ("пример.example.test", "xn--e1afmkfd.example.test"),
    ],
)
def test_it_stores_a_valid_internationalized_name_as_its_a_label(world, name, stored):
    response = world.client(world.owner_key).post("/api/v1/domains/", {"name": name}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["name"] == stored
    assert Domain.objects.get(pk=response.json()["id"]).name == stored


def test_it_refuses_a_domain_another_tenant_owns(world):
    response = world.client(world.owner_key).post("/api/v1/domains/", {"name": "OUTSIDER.example.test"}, format="json")
    assert response.status_code == 400
    assert Domain.objects.get(name="outsider.example.test").tenant == world.outsider_tenant


def test_it_changes_the_recipient_policy(world):
    client = world.client(world.owner_key)
    response = client.patch(f"/api/v1/domains/{world.domain.pk}/", {"recipient_policy": "catch_all"}, format="json")
    assert response.status_code == 200
    world.domain.refresh_from_db()
    assert world.domain.recipient_policy == "catch_all"


def test_it_keeps_a_domain_that_still_has_mailboxes(world):
    response = world.client(world.owner_key).delete(f"/api/v1/domains/{world.domain.pk}/")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "domain_not_empty"
    assert Domain.objects.filter(pk=world.domain.pk).exists()


def test_it_deletes_an_empty_domain(world):
    client = world.client(world.owner_key)
    created = client.post("/api/v1/domains/", {"name": "empty.example.test"}, format="json").json()
    assert client.delete(f"/api/v1/domains/{created['id']}/").status_code == 204
    assert not Domain.objects.filter(pk=created["id"]).exists()


def test_it_lets_a_domain_scoped_key_see_only_its_domain(world):
    other = Domain.objects.create(tenant=world.tenant, name="other.example.test")
    MailboxFactory(domain=other, local_part="elsewhere")
    secret = world.key(["mailboxes:manage", "domains:manage"], domains=[world.domain])
    client = world.client(secret)
    assert [row["name"] for row in client.get("/api/v1/domains/").json()["results"]] == ["acme.example.test"]
    assert client.get(f"/api/v1/domains/{other.pk}/").status_code == 404
    assert client.post("/api/v1/domains/", {"name": "new.example.test"}, format="json").status_code == 403
    addresses = {row["address"] for row in client.get("/api/v1/mailboxes/").json()["results"]}
    assert addresses == {"inbox@acme.example.test", "sibling@acme.example.test"}


def test_it_shows_a_mailbox_scoped_key_its_domain_but_never_lets_it_change_it(world):
    secret = world.key(["domains:manage", "messages:read"], mailboxes=[world.mailbox])
    client = world.client(secret)
    assert client.get(f"/api/v1/domains/{world.domain.pk}/").status_code == 200
    response = client.patch(f"/api/v1/domains/{world.domain.pk}/", {"recipient_policy": "drop"}, format="json")
    assert response.status_code == 404


def test_it_reads_and_renames_the_tenant(world):
    client = world.client(world.owner_key)
    assert client.get("/api/v1/tenant/").json()["name"] == "Acme"
    response = client.patch("/api/v1/tenant/", {"name": "Acme Mail"}, format="json")
    assert response.status_code == 200 and response.json()["name"] == "Acme Mail"
    entry = AuditEntry.objects.get(action="tenant.update")
    assert entry.before == {"name": "Acme"} and entry.after == {"name": "Acme Mail"}


def test_it_lets_several_tenants_hold_the_same_pending_name(world):
    theirs = world.client(world.outsider_key).post("/api/v1/domains/", {"name": "shared.example.test"}, format="json")
    mine = world.client(world.owner_key).post("/api/v1/domains/", {"name": "Shared.Example.Test"}, format="json")
    assert (theirs.status_code, mine.status_code) == (201, 201), mine.content
    assert Domain.objects.filter(name="shared.example.test", state="pending").count() == 2
    again = world.client(world.owner_key).post("/api/v1/domains/", {"name": "shared.example.test"}, format="json")
    assert again.status_code == 400  # once per tenant


def test_it_gives_a_shared_pending_name_to_the_first_tenant_that_verifies_it(world, dns_zone):
    squatter = world.client(world.outsider_key).post("/api/v1/domains/", {"name": "shared.example.test"}, format="json")
    owner = world.client(world.owner_key).post("/api/v1/domains/", {"name": "shared.example.test"}, format="json")
    squatter_domain, owner_domain = (Domain.objects.get(pk=r.json()["id"]) for r in (squatter, owner))
    dns_zone.set("shared.example.test", "TXT", [owner_domain.verification_record, squatter_domain.verification_record])
    dns_zone.set("shared.example.test", "MX", [(10, "mx1.mailplatform.test.")])
    verified = world.client(world.owner_key).post(f"/api/v1/domains/{owner_domain.pk}/verify/").json()
    assert verified["state"] == "verified"
    lost = world.client(world.outsider_key).post(f"/api/v1/domains/{squatter_domain.pk}/verify/").json()
    assert lost["state"] == "pending"
    assert lost["check"]["error"] == "This domain name cannot be verified for this tenant."
    squatter_domain.refresh_from_db()
    assert squatter_domain.state == "pending" and squatter_domain.txt_ok


def test_it_refuses_another_tenants_verified_names_and_their_subdomains_with_one_generic_answer(world, settings):
    client = world.client(world.owner_key)
    bodies = []
    for name in ("outsider.example.test", "mail.outsider.example.test", "x." + settings.TEMP_INBOX_DOMAIN):
        response = client.post("/api/v1/domains/", {"name": name}, format="json")
        assert response.status_code == 400, name
        bodies.append(response.json())
    assert bodies[0] == bodies[1] == bodies[2]
    assert bodies[0]["error"]["code"] == "domain_unavailable"
    text = str(bodies[0]).lower()
    assert not any(word in text for word in ("registered", "taken", "another tenant", "owned", "exists"))
    assert not Domain.objects.filter(tenant=world.tenant, name__endswith="outsider.example.test").exists()


def test_it_lets_a_tenant_add_subdomains_of_its_own_verified_domain(world):
    response = world.client(world.owner_key).post("/api/v1/domains/", {"name": "eu.acme.example.test"}, format="json")
    assert response.status_code == 201, response.content
    outsider = world.client(world.outsider_key).post(
        "/api/v1/domains/", {"name": "us.acme.example.test"}, format="json"
    )
    assert outsider.status_code == 400


@pytest.mark.parametrize("parent_state", ["pending", "verified"])
def test_it_counts_only_the_exact_same_name_as_a_duplicate(world, parent_state):
    client = world.client(world.owner_key)
    parent = client.post("/api/v1/domains/", {"name": "parent.example.test"}, format="json")
    assert parent.status_code == 201
    Domain.objects.filter(pk=parent.json()["id"]).update(state=parent_state)
    # Subdomains of a domain the tenant holds, and a parent added after its subdomain.
    names = ("eu.parent.example.test", "mail.eu.parent.example.test", "sub.later.example.test", "later.example.test")
    for name in names:
        response = client.post("/api/v1/domains/", {"name": name}, format="json")
        assert response.status_code == 201, (name, response.content)
    again = client.post("/api/v1/domains/", {"name": "EU.Parent.Example.Test."}, format="json")
    assert again.status_code == 400
    assert again.json()["error"]["details"]["name"] == ["This tenant already has this domain."]
    assert Domain.objects.filter(tenant=world.tenant, name="eu.parent.example.test").count() == 1


def test_it_lets_the_verified_owner_create_addresses_a_pending_squatter_created_first(world, dns_zone):
    from ingest.directory import RecipientDirectory

    squatter, owner = world.client(world.outsider_key), world.client(world.owner_key)
    theirs = squatter.post("/api/v1/domains/", {"name": "owned.example.test"}, format="json").json()
    assert squatter.post("/api/v1/mailboxes/", {"address": "info@owned.example.test"}, format="json").status_code == 201
    mine = owner.post("/api/v1/domains/", {"name": "owned.example.test"}, format="json").json()
    created = owner.post("/api/v1/mailboxes/", {"address": "info@owned.example.test"}, format="json")
    assert created.status_code == 201, created.content  # nothing said about the other tenant's mailbox
    domain = Domain.objects.get(pk=mine["id"])
    dns_zone.set(domain.name, "TXT", [domain.verification_record])
    dns_zone.set(domain.name, "MX", [(10, "mx1.mailplatform.test.")])
    assert owner.post(f"/api/v1/domains/{domain.pk}/verify/").json()["state"] == "verified"
    directory = RecipientDirectory(check_misses=False)
    assert directory.reload()
    decision = directory.decide("info@owned.example.test")
    assert (decision.reply.code, decision.mailbox_id) == (250, created.json()["id"])
    assert Domain.objects.get(pk=theirs["id"]).state == "pending"
