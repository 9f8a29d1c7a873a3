"""Walks every route under /api/v1/ and proves tenant isolation on each one.

For every route and method:
- an outsider's key (every permission, another tenant) gets 404 for tenant A's objects and
  never sees them in a list, and its writes leave them untouched;
- a key of tenant A lacking the route's permission gets 403;
- a key scoped to one mailbox gets 404 for its sibling mailbox's objects.

A route missing from ROUTES fails the walk, so a new endpoint cannot ship without joining it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from mailboxes.tests.pool_fixtures import pools_of
from outbound.tests import walks as outbound_walks
from tenants.access import ALL_PERMISSIONS, TENANT_WIDE_PERMISSIONS
from tenants.api.permissions import required_permission

Kwargs = Callable[[Any], dict[str, Any]]


@dataclass(frozen=True)
class Route:
    """How to call one named route with tenant A's objects."""

    kwargs: Kwargs | None = None  # None: a collection route
    # The same route pointed at the sibling mailbox's object (for the mailbox-scoped key).
    sibling_kwargs: Kwargs | None = None
    body: Callable[[Any], dict[str, Any]] = field(default=lambda world: {})
    public: bool = False
    # A tenant's one-of-a-kind resource (no id in the path): the outsider reads its own, or 404.
    singleton: bool = False


ROUTES: dict[str, Route] = {
    "schema": Route(public=True),
    "docs": Route(public=True),
    "temp-inbox-create": Route(public=True),  # no key: creates in the platform's temporary tenant
    "tenant": Route(body=lambda w: {"name": "Renamed"}),
    "domain-list": Route(body=lambda w: {"name": "new.example.test"}),
    "domain-detail": Route(kwargs=lambda w: {"pk": w.domain.pk}, body=lambda w: {"recipient_policy": "drop"}),
    "domain-verify": Route(kwargs=lambda w: {"pk": w.domain.pk}),
    "audit-list": Route(),
    "audit-export": Route(),
    "sso": Route(
        singleton=True, body=lambda w: {"issuer": "http://127.0.0.1:9", "client_id": "x", "email_domains": ["a.test"]}
    ),
    "mailbox-list": Route(body=lambda w: {"address": "fresh@acme.example.test"}),
    "mailbox-detail": Route(
        kwargs=lambda w: {"pk": w.mailbox.pk},
        sibling_kwargs=lambda w: {"pk": w.sibling.pk},
        body=lambda w: {"name": "x"},
    ),
    "api-key-list": Route(body=lambda w: {"name": "k", "permissions": ["messages:read"]}),
    "api-key-detail": Route(kwargs=lambda w: {"pk": w.victim_key_id}),
    "api-key-revoke": Route(kwargs=lambda w: {"pk": w.victim_key_id}),
    "message-list": Route(),
    "message-wait": Route(),
    "message-detail": Route(
        kwargs=lambda w: {"pk": w.message.pk},
        sibling_kwargs=lambda w: {"pk": w.sibling_message.pk},
        body=lambda w: {"is_read": True, "tags": ["x"]},
    ),
    "message-rescan": Route(
        kwargs=lambda w: {"pk": w.message.pk}, sibling_kwargs=lambda w: {"pk": w.sibling_message.pk}
    ),
    "message-raw": Route(kwargs=lambda w: {"pk": w.message.pk}, sibling_kwargs=lambda w: {"pk": w.sibling_message.pk}),
    "message-attachment": Route(
        kwargs=lambda w: {"pk": w.message.pk, "attachment_id": w.attachment_id},
        sibling_kwargs=lambda w: {"pk": w.sibling_message.pk, "attachment_id": w.sibling_attachment_id},
    ),
    "webhook-list": Route(body=lambda w: {"url": "http://127.0.0.1:9/new"}),
    "webhook-detail": Route(kwargs=lambda w: {"pk": w.webhook_id}, body=lambda w: {"description": "x"}),
    "webhook-rotate-secret": Route(kwargs=lambda w: {"pk": w.webhook_id}),
    "webhook-replay": Route(kwargs=lambda w: {"pk": w.webhook_id}, body=lambda w: {"after": w.mailbox_event_id}),
    "webhook-delivery-list": Route(kwargs=lambda w: {"endpoint_id": w.webhook_id}),
    "webhook-delivery-detail": Route(kwargs=lambda w: {"endpoint_id": w.webhook_id, "pk": w.webhook_delivery_id}),
    "webhook-delivery-retry": Route(kwargs=lambda w: {"endpoint_id": w.webhook_id, "pk": w.webhook_delivery_id}),
    "mailbox-messages-upload": Route(
        kwargs=lambda w: {"pk": w.mailbox.pk}, sibling_kwargs=lambda w: {"pk": w.sibling.pk}
    ),
    "mailbox-code-latest": Route(kwargs=lambda w: {"pk": w.mailbox.pk}, sibling_kwargs=lambda w: {"pk": w.sibling.pk}),
    "connector-list": Route(
        body=lambda w: {
            "mailbox": str(w.mailbox.pk),
            "host": "127.0.0.1",
            "port": 9,
            "tls_mode": "none",
            "username": "u",
            "password": "p",
        }
    ),
    "connector-detail": Route(
        kwargs=lambda w: {"pk": w.connector_id},
        sibling_kwargs=lambda w: {"pk": w.sibling_connector_id},
        body=lambda w: {"name": "x"},
    ),
    "connector-test": Route(
        kwargs=lambda w: {"pk": w.connector_id}, sibling_kwargs=lambda w: {"pk": w.sibling_connector_id}
    ),
    "connector-resync": Route(
        kwargs=lambda w: {"pk": w.connector_id}, sibling_kwargs=lambda w: {"pk": w.sibling_connector_id}
    ),
    "connector-reconnect": Route(
        kwargs=lambda w: {"pk": w.connector_id}, sibling_kwargs=lambda w: {"pk": w.sibling_connector_id}
    ),
    "connector-oauth-initiate": Route(body=lambda w: {"connector": str(w.connector_id)}),
    # Pools and bindings (mailboxes/tests/pool_fixtures.py: an account bound to each mailbox).
    "pool-list": Route(body=lambda w: {"name": "new pool", "domain": str(w.domain.pk)}),
    "pool-detail": Route(kwargs=lambda w: {"pk": pools_of(w).pool.pk}, body=lambda w: {"name": "renamed"}),
    "binding-list": Route(),
    "binding-link-or-create": Route(
        body=lambda w: {"account_ref": "acct-new", "provider": "openai", "pool": str(pools_of(w).pool.pk)}
    ),
    "binding-detail": Route(
        kwargs=lambda w: {"pk": pools_of(w).own.pk}, sibling_kwargs=lambda w: {"pk": pools_of(w).sibling.pk}
    ),
    "binding-reassign": Route(
        kwargs=lambda w: {"pk": pools_of(w).own.pk}, sibling_kwargs=lambda w: {"pk": pools_of(w).sibling.pk}
    ),
    "binding-release": Route(
        kwargs=lambda w: {"pk": pools_of(w).own.pk}, sibling_kwargs=lambda w: {"pk": pools_of(w).sibling.pk}
    ),
    "link-detail": Route(
        kwargs=lambda w: {"link": pools_of(w).own_link}, sibling_kwargs=lambda w: {"link": pools_of(w).sibling_link}
    ),
    "link-code-latest": Route(
        kwargs=lambda w: {"link": pools_of(w).own_link}, sibling_kwargs=lambda w: {"link": pools_of(w).sibling_link}
    ),
    "account-code-latest": Route(
        kwargs=lambda w: {"account_ref": pools_of(w).own.account_ref},
        sibling_kwargs=lambda w: {"account_ref": pools_of(w).sibling.account_ref},
    ),
    "provider-list": Route(body=lambda w: {"name": "newprov"}),
    "provider-detail": Route(
        kwargs=lambda w: {"pk": pools_of(w).provider.pk}, body=lambda w: {"sender_domains": ["x.example"]}
    ),
    "message-send": Route(body=lambda w: dict(outbound_walks.SEND_BODY)),
    "outbound-message-list": Route(),
    "outbound-message-detail": Route(
        kwargs=lambda w: {"pk": outbound_walks.outbound_message(w, w.mailbox).pk},
        sibling_kwargs=lambda w: {"pk": outbound_walks.outbound_message(w, w.sibling).pk},
    ),
    "dkim-key-list": Route(kwargs=lambda w: {"domain_id": w.domain.pk}, body=lambda w: {"algorithm": "ed25519"}),
    "dkim-key-detail": Route(kwargs=outbound_walks.dkim_key_kwargs),
    "domain-sending": Route(kwargs=lambda w: {"domain_id": w.domain.pk}, body=lambda w: {"any_local_part": True}),
    "dkim-key-verify": Route(kwargs=outbound_walks.dkim_key_kwargs),
    "suppression-list": Route(body=lambda w: {"address": "someone@remote.example.org"}),
    "suppression-detail": Route(kwargs=lambda w: {"pk": outbound_walks.suppression(w).pk}),
    "event-list": Route(),
    "event-detail": Route(
        kwargs=lambda w: {"event_id": w.mailbox_event_id},
        sibling_kwargs=lambda w: {"event_id": w.sibling_event_id},
    ),
}


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    permission: Any  # a permission name, None for any key, or the "undeclared" marker
    route: Route


def _walk(patterns: list[Any], prefix: str = "") -> Iterator[tuple[str, URLPattern]]:
    for entry in patterns:
        if isinstance(entry, URLResolver):
            yield from _walk(entry.url_patterns, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern):
            yield prefix + str(entry.pattern), entry


def _methods(callback: Any) -> dict[str, Any]:
    """HTTP method -> a view instance set up the way DRF dispatches it."""
    actions = getattr(callback, "actions", None)
    cls = getattr(callback, "cls", None) or getattr(callback, "view_class", None)
    result = {}
    if actions:
        for method, action in actions.items():
            view = cls(**getattr(callback, "initkwargs", {}))
            view.action_map, view.action = actions, action
            result[method.upper()] = view
    elif cls is not None:
        for method in ("get", "post", "put", "patch", "delete"):
            if hasattr(cls, method):
                view = cls()
                result[method.upper()] = view
    return result


def api_endpoints() -> list[Endpoint]:
    endpoints, uncovered = [], []
    for path, pattern in _walk(get_resolver().url_patterns):
        if not path.startswith("api/v1/") or pattern.name is None:
            continue
        route = ROUTES.get(pattern.name)
        if route is None:
            uncovered.append(pattern.name)
            continue
        for method, view in _methods(pattern.callback).items():
            permission = None if route.public else required_permission(view, method)
            endpoints.append(Endpoint(pattern.name, method, permission, route))
    assert not uncovered, f"routes not covered by the isolation walk, add them to ROUTES: {sorted(set(uncovered))}"
    return endpoints


ENDPOINTS = api_endpoints()
PROTECTED = [endpoint for endpoint in ENDPOINTS if not endpoint.route.public]
# Collection writes act in the caller's own tenant: the per-resource tests show that an
# outsider cannot reference tenant A's objects in them.
OUTSIDER_REACHABLE = [e for e in PROTECTED if e.route.kwargs is not None or e.method == "GET"]


def _text(response: Any) -> str:
    body = b"".join(response.streaming_content) if response.streaming else response.content
    return str(body.decode())


def _id(endpoint: Endpoint) -> str:
    return f"{endpoint.method} {endpoint.name}"


def _call(client: Any, endpoint: Endpoint, kwargs: dict[str, Any], body: dict[str, Any]) -> Any:
    url = reverse(endpoint.name, kwargs=kwargs or None)
    caller = getattr(client, endpoint.method.lower())
    if endpoint.method in {"POST", "PUT", "PATCH"}:
        return caller(url, data=json.dumps(body), content_type="application/json")
    return caller(url)


def test_it_covers_every_api_route():
    names = {endpoint.name for endpoint in ENDPOINTS}
    assert {"domain-detail", "mailbox-detail", "api-key-revoke", "event-list"} <= names
    assert all(endpoint.permission is not None or endpoint.method == "GET" for endpoint in PROTECTED), (
        "every write must need a permission"
    )


@pytest.mark.parametrize("endpoint", OUTSIDER_REACHABLE, ids=_id)
def test_it_answers_404_to_an_outsider_for_tenant_a_objects(cast, endpoint):
    outsider = cast.client(cast.outsider_key)
    if endpoint.route.kwargs is None:
        response = _call(outsider, endpoint, {}, {})
        assert response.status_code == (404 if endpoint.route.singleton else 200), response.content
        body = _text(response)
        for secret_id in (cast.mailbox.pk, cast.sibling.pk, cast.domain.pk, cast.victim_key_id, cast.tenant.pk):
            assert str(secret_id) not in body
        assert cast.mailbox_event_id not in body
        return
    response = _call(outsider, endpoint, endpoint.route.kwargs(cast), endpoint.route.body(cast))
    assert response.status_code == 404, response.content
    assert response.json()["error"]["code"] == "not_found"
    # Nothing of tenant A changed.
    cast.mailbox.refresh_from_db()
    cast.domain.refresh_from_db()
    assert cast.mailbox.name == ""
    assert cast.domain.recipient_policy == "reject"
    from tenants.models import ApiKey

    assert ApiKey.objects.get(pk=cast.victim_key_id).revoked_at is None


@pytest.mark.parametrize("endpoint", [e for e in PROTECTED if e.permission is not None], ids=_id)
def test_it_answers_403_to_a_key_without_the_permission(cast, endpoint):
    others = sorted(set(ALL_PERMISSIONS) - {endpoint.permission})
    client = cast.client(cast.key(others, name="lacking"))
    kwargs = endpoint.route.kwargs(cast) if endpoint.route.kwargs else {}
    response = _call(client, endpoint, kwargs, endpoint.route.body(cast))
    assert response.status_code == 403, response.content
    assert response.json()["error"]["code"] == "missing_permission"


@pytest.mark.parametrize("endpoint", PROTECTED, ids=_id)
def test_it_hides_the_sibling_mailbox_from_a_key_scoped_to_one_mailbox(cast, endpoint):
    scoped_permissions = sorted(set(ALL_PERMISSIONS) - TENANT_WIDE_PERMISSIONS)
    client = cast.client(cast.key(scoped_permissions, mailboxes=[cast.mailbox], name="one mailbox"))
    if endpoint.route.sibling_kwargs is not None:
        response = _call(client, endpoint, endpoint.route.sibling_kwargs(cast), endpoint.route.body(cast))
        assert response.status_code == 404, response.content
        cast.sibling.refresh_from_db()
        assert cast.sibling.name == ""
        # ...while the same route works on its own mailbox, for reads.
        if endpoint.method == "GET":
            own = _call(client, endpoint, endpoint.route.kwargs(cast), {})
            assert own.status_code == 200, own.content
    elif endpoint.route.kwargs is None and endpoint.method == "GET":
        response = _call(client, endpoint, {}, {})
        assert response.status_code in {200, 403}, response.content
        body = _text(response)
        assert str(cast.sibling.pk) not in body
        assert cast.sibling_event_id not in body
