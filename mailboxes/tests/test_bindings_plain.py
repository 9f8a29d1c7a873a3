"""link-or-create's hand-read body and hand-written answer say exactly what its serializers say."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from rest_framework.renderers import JSONRenderer

from mailboxes.api.binding_serializers import (
    LinkOrCreateResultSerializer,
    LinkOrCreateSerializer,
    binding_representation,
    link_or_create_plain,
)
from mailboxes.bindings import services
from mailboxes.models import AccountBinding
from tenants.access import Principal

POOL = str(uuid.uuid4())

BODIES: list[Any] = [
    {"account_ref": "acct-1", "provider": "google", "pool": POOL},
    {"account_ref": "  padded  ", "provider": " GitHub ", "pool": POOL.upper()},
    {"account_ref": "acct-1", "provider": "google", "pool": POOL.replace("-", "")},
    {"account_ref": "acct-1", "provider": "google", "pool": "{" + POOL + "}"},
    {"account_ref": "acct-1", "provider": "google", "pool": POOL, "label": " Team A "},
    {"account_ref": "acct-1", "provider": "google", "pool": POOL, "label": "   "},
    {"account_ref": "acct-1", "provider": "google", "pool": POOL, "label": None},
    {"account_ref": "acct-1", "provider": "google", "pool": POOL, "label": "x" * 201},
    {"account_ref": "acct-1", "provider": "google", "pool": POOL, "metadata": {"a": 1}},
    {"account_ref": "a" * 200, "provider": "p", "pool": POOL},
    {"account_ref": "a" * 201, "provider": "p", "pool": POOL},
    {"account_ref": "   ", "provider": "google", "pool": POOL},
    {"account_ref": "", "provider": "google", "pool": POOL},
    {"account_ref": "nul\x00", "provider": "google", "pool": POOL},
    {"account_ref": "ünïcode", "provider": "google", "pool": POOL},
    {"account_ref": 12, "provider": "google", "pool": POOL},
    {"account_ref": True, "provider": "google", "pool": POOL},
    {"account_ref": "acct-1", "provider": "-bad", "pool": POOL},
    {"account_ref": "acct-1", "provider": "p" * 41, "pool": POOL},
    {"account_ref": "acct-1", "provider": "google", "pool": "not-a-uuid"},
    {"account_ref": "acct-1", "provider": "google", "pool": " " + POOL},
    {"account_ref": "acct-1", "provider": "google", "pool": 5},
    {"account_ref": "acct-1", "provider": "google"},
    {"account_ref": "acct-1", "provider": "google", "pool": POOL, "mailbox": POOL},
    ["account_ref"],
    "text",
]


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
def test_the_plain_reading_is_the_serializers_or_leaves_it_to_them(body):
    plain = link_or_create_plain(body)
    serializer = LinkOrCreateSerializer(data=body)
    if plain is None:
        return  # the serializer answers, errors included
    assert serializer.is_valid(), serializer.errors
    assert plain == dict(serializer.validated_data)


def test_the_plain_reading_takes_the_common_shapes():
    assert link_or_create_plain(BODIES[0]) is not None
    assert link_or_create_plain(BODIES[4]) is not None
    assert link_or_create_plain(BODIES[8]) is None  # metadata: the serializer bounds it


def _rendered(value: Any) -> Any:
    return json.loads(JSONRenderer().render(value))


def test_the_answer_is_the_serializers_in_every_state(world):
    client = world.client(world.owner_key)
    pool = client.post("/api/v1/pools/", {"name": "p", "domain": str(world.domain.pk), "size": 2}, format="json")
    assert pool.status_code == 201, pool.content
    principal = Principal.system(world.tenant)
    from mailboxes.models import MailboxPool

    pool_row = MailboxPool.objects.get(pk=pool.json()["id"])
    made = services.binding_link_or_create(
        principal=principal, pool=pool_row, account_ref="acct-1", provider="google", label="L", metadata={"k": [1]}
    )
    moved = services.binding_reassign(principal=principal, binding=made.binding, mailbox=None, pool=None)
    released = services.binding_release(principal=principal, binding=moved)
    for binding_id, created, link in (
        (made.binding.pk, True, made.link),
        (moved.pk, False, None),
        (released.pk, False, None),
    ):
        binding = AccountBinding.objects.select_related("mailbox").get(pk=binding_id)
        expected = LinkOrCreateResultSerializer(binding, context={"created": created, "link": link}).data
        assert _rendered(binding_representation(binding, created=created, link=link)) == _rendered(expected)
    first = AccountBinding.objects.select_related("mailbox").get(pk=made.binding.pk)
    assert first.successor_id is not None and first.released_at is not None  # the states were covered


def test_the_api_answers_the_same_through_the_plain_path_and_the_serializer(world):
    client = world.client(world.owner_key)
    pool = client.post("/api/v1/pools/", {"name": "p", "domain": str(world.domain.pk), "size": 2}, format="json").json()
    plain = client.post(
        "/api/v1/bindings/link-or-create", {"account_ref": "a", "provider": "google", "pool": pool["id"]}, format="json"
    )
    through_serializer = client.post(
        "/api/v1/bindings/link-or-create",
        {"account_ref": "a", "provider": "google", "pool": pool["id"], "metadata": {}},
        format="json",
    )
    assert (plain.status_code, through_serializer.status_code) == (201, 200)
    assert {k: v for k, v in plain.json().items() if k not in {"created", "link"}} == {
        k: v for k, v in through_serializer.json().items() if k not in {"created", "link"}
    }
