"""Where the trust verdicts show: the message API's ``authentication`` object, search
operators (``auth:dmarc=fail``), the web inbox's badges."""

from __future__ import annotations

from collections.abc import Iterator
from html import unescape
from typing import Any

import pytest
from django.test import Client

from mailboxes import authentication
from mailboxes.tests import authentication_helpers as helpers
from mailboxes.tests.helpers import message_deliver, simple_message


@pytest.fixture
def zone(dns_zone: Any, settings: Any) -> Iterator[Any]:
    yield helpers.zone_prepare(dns_zone, settings)
    authentication.dns_cache_clear()


@pytest.fixture
def mail(world: Any, zone: Any) -> dict[str, Any]:
    """A message that passes everything, one that fails DMARC, one with SPF softfail."""
    key = helpers.rsa_key()
    helpers.publish_key(zone, key)
    helpers.publish_sender(zone, "soft.test", spf="v=spf1 ip4:192.0.2.1 ~all", dmarc="v=DMARC1; p=none")
    to = world.mailbox.address
    return {
        "good": helpers.deliver(world.mailbox, helpers.dkim_sign(helpers.message(to=to, subject="Good"), key)),
        "forged": helpers.deliver(
            world.mailbox, helpers.message(to=to, subject="Forged", sender="ceo@origin.test"), remote_ip="192.0.2.66"
        ),
        "soft": helpers.deliver(
            world.mailbox, helpers.message(to=to, subject="Soft", sender="a@soft.test"), mail_from="a@soft.test"
        ),
    }


def test_it_shows_the_authentication_object_in_the_message_api(world: Any, mail: dict[str, Any]) -> None:
    body = world.client(world.owner_key).get(f"/api/v1/messages/{mail['good'].pk}/").json()

    auth = body["authentication"]
    assert auth["authserv_id"] == helpers.OUR_ID
    assert auth["sender_ip_known"] is True
    assert auth["source"] == "smtp"
    assert auth["spf"]["result"] == "pass"
    assert auth["dkim"] == [
        {
            "result": "pass",
            "domain": "origin.test",
            "selector": "s1",
            "algorithm": "rsa-sha256",
            "aligned": True,
            "reason": "",
        }
    ]
    assert auth["dmarc"]["result"] == "pass"
    assert auth["dmarc"]["policy"] == "reject"
    assert auth["dmarc"]["alignment"]["dkim"] is True
    assert auth["arc"] == {"result": "none", "instances": 0, "sealers": [], "reason": ""}
    assert auth["header"] == body["authentication_results"]
    assert body["headers"][0] == ["Authentication-Results", auth["header"]]


def test_it_answers_null_for_a_message_never_verified(world: Any, settings: Any) -> None:
    settings.AUTH_VERIFY = False
    message = message_deliver(world.mailbox, simple_message(to=world.mailbox.address))

    body = world.client(world.owner_key).get(f"/api/v1/messages/{message.pk}/").json()
    assert body["authentication"] is None


def test_it_describes_the_authentication_object_in_the_schema(client: Any) -> None:
    schemas = client.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()["components"][
        "schemas"
    ]
    detail = schemas["MessageDetail"]["properties"]["authentication"]
    assert detail.get("nullable") is True or {"type": "null"} in detail.get("oneOf", [])
    auth = schemas["Authentication"]["properties"]
    assert set(auth) == {
        "authserv_id",
        "header",
        "verified_at",
        "source",
        "sender_ip_known",
        "spf",
        "dkim",
        "dmarc",
        "arc",
    }
    assert set(schemas["DmarcVerdict"]["properties"]) >= {"result", "domain", "policy", "alignment", "pct"}
    assert set(schemas["DkimVerdict"]["properties"]) >= {"result", "domain", "selector", "algorithm", "aligned"}


@pytest.mark.parametrize(
    ("query", "subjects"),
    [
        ("auth:dmarc=fail", {"Forged", "Soft"}),  # soft.test publishes p=none: a fail all the same
        ("auth:dmarc=fail auth:spf=fail", {"Forged"}),
        ("auth:dmarc=pass", {"Good"}),
        ("auth:dkim=pass", {"Good"}),
        ("auth:dkim=none", {"Forged", "Soft"}),
        ("auth:spf=softfail", {"Soft"}),
        ("auth:spf=fail", {"Forged"}),
        ("-auth:dmarc=fail", {"Good"}),
        ("AUTH:DMARC=FAIL -from:soft", {"Forged"}),
    ],
)
def test_it_searches_by_verdict(world: Any, mail: dict[str, Any], query: str, subjects: set[str]) -> None:
    response = world.client(world.owner_key).get("/api/v1/messages/", {"mailbox": world.mailbox.pk, "q": query})

    assert response.status_code == 200, response.content
    assert {item["subject"] for item in response.json()["results"]} == subjects


@pytest.mark.parametrize("query", ["auth:dmarc", "auth:dmarc=maybe", "auth:bimi=pass", "auth:arc=softfail"])
def test_it_refuses_a_verdict_search_it_cannot_answer(world: Any, query: str) -> None:
    response = world.client(world.owner_key).get("/api/v1/messages/", {"q": query})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_query"


def test_it_shows_a_badge_per_mechanism_with_its_reason_in_the_web_inbox(world: Any, mail: dict[str, Any]) -> None:
    client = Client()
    client.force_login(world.owner)
    page = unescape(client.get(f"/inbox/{world.tenant.slug}/m/{mail['forged'].pk}/").content.decode())

    assert '<li class="badge fail"><strong>SPF</strong> fail <span class="detail">origin.test</span>' in page
    assert '<li class="badge neutral"><strong>DKIM</strong> none' in page
    assert (
        '<li class="badge fail"><strong>DMARC</strong> fail <span class="detail">origin.test</span>'
        ' <span class="detail">p=reject</span> <span class="reason">no aligned DKIM signature; SPF fail</span>'
    ) in page
    assert f"Verified by {helpers.OUR_ID}" in page

    good = unescape(client.get(f"/inbox/{world.tenant.slug}/m/{mail['good'].pk}/").content.decode())
    assert '<li class="badge pass"><strong>DKIM</strong> pass <span class="detail">origin.test s=s1</span>' in good
    assert '<li class="badge pass"><strong>DMARC</strong> pass' in good
