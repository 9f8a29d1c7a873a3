"""Every write endpoint of the API, fed hostile input, answers 4xx in the error shape; never 5xx."""

from __future__ import annotations

import json

import pytest
from django.urls import reverse

from tests.test_isolation import PROTECTED

WRITES = [endpoint for endpoint in PROTECTED if endpoint.method in {"POST", "PUT", "PATCH", "DELETE"}]

HOSTILE_BODIES: list[tuple[str, bytes, str]] = [
    ("not json", b"{name: 'x'", "application/json"),
    ("json array", b"[1, 2, 3]", "application/json"),
    ("json string", b'"hello"', "application/json"),
    ("json null", b"null", "application/json"),
    ("form encoded", b"name=x&permissions=all", "application/x-www-form-urlencoded"),
    ("xml", b"<name>x</name>", "application/xml"),
    (
        "nul bytes",
        json.dumps({"name": "a\x00b", "address": "a\x00@b.c", "local_part": "a\x00"}).encode(),
        "application/json",
    ),
    ("lone surrogate", b'{"name": "\\ud800", "address": "\\udfff@x.y", "local_part": "\\ud800"}', "application/json"),
    (
        "wrong types",
        json.dumps(
            {
                "name": ["x"],
                "permissions": "all",
                "domains": "x",
                "mailboxes": 5,
                "address": 7,
                "domain": {"a": 1},
                "is_catch_all": "maybe",
                "retention_days": "ten",
                "expires_at": "tomorrow",
                "recipient_policy": 3,
            }
        ).encode(),
        "application/json",
    ),
    (
        "nulls",
        json.dumps(
            {
                "name": None,
                "permissions": None,
                "address": None,
                "domain": None,
                "recipient_policy": None,
                "local_part": None,
            }
        ).encode(),
        "application/json",
    ),
    (
        "huge strings",
        json.dumps(
            {"name": "x" * 100_000, "address": "a" * 10_000 + "@acme.example.test", "local_part": "b" * 10_000}
        ).encode(),
        "application/json",
    ),
    (
        "huge numbers",
        json.dumps({"retention_days": 10**40, "name": "n", "expires_at": "9999-99-99T99:99:99Z"}).encode(),
        "application/json",
    ),
    (
        "bad uuids",
        json.dumps(
            {
                "name": "k",
                "permissions": ["messages:read"],
                "domains": ["not-a-uuid"],
                "mailboxes": ["00000000-0000-0000-0000-00000000000g"],
                "domain": "zzz",
            }
        ).encode(),
        "application/json",
    ),
    (
        "unknown ids",
        json.dumps(
            {
                "name": "k",
                "permissions": ["messages:read"],
                "mailboxes": ["00000000-0000-0000-0000-000000000000"],
                "domain": "00000000-0000-0000-0000-000000000000",
            }
        ).encode(),
        "application/json",
    ),
    ("deep nesting", ("[" * 5000 + "]" * 5000).encode(), "application/json"),
    ("invalid utf-8", b'{"name": "\xff\xfe"}', "application/json"),
]


def _url(endpoint, world):
    kwargs = endpoint.route.kwargs(world) if endpoint.route.kwargs else None
    return reverse(endpoint.name, kwargs=kwargs)


def _assert_error_shape(response):
    assert response.status_code < 500, response.content[:500]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["code"], str)
        assert error["code"]
        assert isinstance(error["message"], str)
        assert error["message"]


@pytest.mark.parametrize("endpoint", WRITES, ids=lambda e: f"{e.method} {e.name}")
def test_it_answers_hostile_bodies_with_a_json_4xx(cast, endpoint):
    from rest_framework.test import APIClient

    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {cast.owner_key}")
    url = _url(endpoint, cast)
    for label, body, content_type in HOSTILE_BODIES:
        response = client.generic(endpoint.method, url, body, content_type=content_type)
        try:
            _assert_error_shape(response)
        except AssertionError as failure:
            raise AssertionError(f"{label}: {failure}") from None


@pytest.mark.parametrize("endpoint", [e for e in PROTECTED if e.route.kwargs], ids=lambda e: f"{e.method} {e.name}")
def test_it_answers_404_for_malformed_ids_in_the_path(cast, endpoint):
    from rest_framework.test import APIClient

    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {cast.owner_key}")
    good = _url(endpoint, cast)
    key = next(iter(endpoint.route.kwargs(cast).values()))
    for bad in ["not-a-uuid", "00000000-0000-0000-0000-000000000000", "%00", "..", "evt_" + "Z" * 200]:
        url = good.replace(str(key), bad)
        response = client.generic(endpoint.method, url, b"{}", content_type="application/json")
        assert response.status_code == 404, (bad, response.status_code, response.content[:300])
        assert response.json()["error"]["code"] == "not_found"
