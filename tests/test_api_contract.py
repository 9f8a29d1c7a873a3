"""Route walks over the API's shared rules: refused fields, cursors, unsupported methods.

- every write that takes a JSON body answers ``400 unknown_field`` for a field it does not
  know, naming it, and ``400 read_only_field`` for one the resource shows but cannot change;
  nothing is dropped quietly;
- every list answers ``400 invalid_cursor`` for a cursor it did not hand out;
- a method a route does not have answers 405 in the error shape, with ``Allow``.
"""

from __future__ import annotations

import json

import pytest
from django.urls import reverse

from tests.test_isolation import PROTECTED

# Raw uploads take message bytes, not JSON fields.
_RAW_BODY = {"mailbox-messages-upload"}
JSON_WRITES = [e for e in PROTECTED if e.method in {"POST", "PUT", "PATCH"} and e.name not in _RAW_BODY]
PUBLIC_JSON_WRITES = ["temp-inbox-create"]
LISTS = [e for e in PROTECTED if e.method == "GET" and e.name.endswith("-list")]


def _url(endpoint, world):
    kwargs = endpoint.route.kwargs(world) if endpoint.route.kwargs else None
    return reverse(endpoint.name, kwargs=kwargs)


def _owner_client(world):
    from rest_framework.test import APIClient

    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {world.owner_key}")
    return client


@pytest.mark.parametrize("endpoint", JSON_WRITES, ids=lambda e: f"{e.method} {e.name}")
def test_it_refuses_an_unknown_field_on_every_write(cast, endpoint):
    body = {**endpoint.route.body(cast), "no_such_field": 1}
    response = _owner_client(cast).generic(
        endpoint.method, _url(endpoint, cast), json.dumps(body), content_type="application/json"
    )
    assert response.status_code == 400, (response.status_code, response.content[:300])
    error = response.json()["error"]
    assert error["code"] == "unknown_field", error
    assert list(error["details"]) == ["no_such_field"]
    assert "no_such_field" in error["message"]


@pytest.mark.parametrize("name", PUBLIC_JSON_WRITES)
def test_it_refuses_an_unknown_field_on_public_writes(db, client, name):
    response = client.post(reverse(name), {"no_such_field": 1}, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unknown_field"


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("/api/v1/tenant/", {"slug": "other"}, "slug"),
        ("/api/v1/tenant/", {"plan": "enterprise"}, "plan"),
        ("mailbox", {"address": "renamed@acme.example.test"}, "address"),
        ("mailbox", {"id": "00000000-0000-0000-0000-000000000000", "name": "x"}, "id"),
        ("domain", {"name": "renamed.example.test"}, "name"),
    ],
)
def test_it_refuses_a_read_only_field_and_changes_nothing(world, url, body, field):
    url = {"mailbox": f"/api/v1/mailboxes/{world.mailbox.pk}/", "domain": f"/api/v1/domains/{world.domain.pk}/"}.get(
        url, url
    )
    client = world.client(world.owner_key)
    before = client.get(url).json()
    response = client.patch(url, body, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "read_only_field", error
    assert field in error["details"]
    assert client.get(url).json() == before


def test_it_names_unknown_and_read_only_fields_together(world):
    response = world.client(world.owner_key).patch("/api/v1/tenant/", {"slug": "x", "colour": "red"}, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "unknown_field"
    assert error["details"]["slug"][0] == "This field cannot be changed."
    assert error["details"]["colour"][0] == "This field is not known."


# Well-formed but made up: base64 of "o=3" and of ":999999" (the two positions lists use),
# bare or with a MAC the API did not compute.
FORGED_CURSORS = ["bz0z", "Ojk5OTk5OQ==", "Ojk5OTk5OQ", "bz0z.AAAAAAAAAAAAAAAA", "Ojk5OTk5OQ.AAAAAAAAAAAAAAAA"]


@pytest.mark.parametrize("endpoint", LISTS, ids=lambda e: e.name)
@pytest.mark.parametrize("cursor", ["not-a-cursor", "bm90IGEgY3Vyc29y", "cD1ub3RhZGF0ZQ==", "%00", *FORGED_CURSORS])
def test_it_answers_400_invalid_cursor_on_every_list(cast, endpoint, cursor):
    client = _owner_client(cast)
    url = _url(endpoint, cast)
    assert "results" in client.get(url).json()
    response = client.get(f"{url}?cursor={cursor}")
    assert response.status_code == 400, (response.status_code, response.content[:300])
    error = response.json()["error"]
    assert error["code"] == "invalid_cursor"
    assert "cursor" in error["details"]


@pytest.mark.parametrize("endpoint", LISTS, ids=lambda e: e.name)
@pytest.mark.parametrize("limit", ["abc", "-1", "0", "1.5", "1e3", " 5", "%00", "99999999999999999999x"])
def test_it_answers_400_naming_limit_when_it_is_not_a_page_size_on_every_list(cast, endpoint, limit):
    client = _owner_client(cast)
    response = client.get(f"{_url(endpoint, cast)}?limit={limit}")
    assert response.status_code == 400, (response.status_code, response.content[:300])
    error = response.json()["error"]
    assert (error["code"], list(error["details"])) == ("validation_error", ["limit"])
    assert "whole number" in error["details"]["limit"][0]


@pytest.mark.parametrize("endpoint", LISTS, ids=lambda e: e.name)
def test_it_serves_a_page_of_limit_rows_and_clamps_a_limit_over_the_maximum(cast, endpoint):
    client = _owner_client(cast)
    url = _url(endpoint, cast)
    everything = client.get(f"{url}?limit=99999999999999999999").json()["results"]  # served at the maximum
    assert everything == client.get(f"{url}?limit=500").json()["results"]
    first = client.get(f"{url}?limit=1").json()
    assert first["results"] == everything[:1]
    assert client.get(f"{url}?limit=").json()["results"] == client.get(url).json()["results"]


@pytest.mark.parametrize("name", ["message-wait", "mailbox-code-latest", "mailbox-messages-upload", "tenant"])
def test_it_answers_405_in_the_error_shape_for_a_method_a_route_lacks(cast, name):
    kwargs = {"pk": cast.mailbox.pk} if name.startswith("mailbox-") else None
    response = _owner_client(cast).put(reverse(name, kwargs=kwargs), {}, format="json")
    assert response.status_code == 405, (response.status_code, response.content[:300])
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert "PUT" not in response["Allow"]
