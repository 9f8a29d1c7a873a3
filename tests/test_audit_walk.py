"""Every write endpoint of the API leaves exactly one audit entry, and no entry holds a secret.

WRITES says how to make each write succeed; a write route missing from it fails the walk,
so a new endpoint cannot skip the audit trail unnoticed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.urls import reverse

from audit.models import AuditEntry
from mailboxes.tests.pool_fixtures import pools_of
from outbound.tests import walks as outbound_walks
from tests.test_isolation import ENDPOINTS

Setup = Callable[[Any], dict[str, Any]]


@dataclass(frozen=True)
class Write:
    kwargs: Setup = field(default=lambda w: {})
    body: Callable[[Any], Any] = field(default=lambda w: {})
    content_type: str = "application/json"
    action: str = ""  # the audit action expected


def _empty_domain(world: Any) -> dict[str, Any]:
    from tenants.models import Domain

    return {"pk": Domain.objects.create(tenant=world.tenant, name="empty.example.test").pk}


def _oauth_connector(world: Any) -> dict[str, Any]:
    """The cast's connector switched to XOAUTH2 with a provider's authorize URL."""
    from ingest.models import Connector

    Connector.objects.filter(pk=world.connector_id).update(
        auth_type="xoauth2", oauth_client_id="c", oauth_authorize_url="https://auth.example.test/authorize",
        oauth_token_url="https://auth.example.test/token",
    )  # fmt: skip
    return {}


def _victim_key(world: Any) -> dict[str, Any]:
    return {"pk": world.victim_key_id}


def _enterprise(world: Any) -> dict[str, Any]:
    from tenants.models import Tenant

    Tenant.objects.filter(pk=world.tenant.pk).update(plan=Tenant.Plan.ENTERPRISE)
    return {}


def _sso_ready(world: Any) -> dict[str, Any]:
    """An enterprise tenant that has proven corp.example.test by DNS: only such a domain may be
    claimed by its SSO (tenants.services.sso_provider_configure)."""
    from tenants.models import Domain

    _enterprise(world)
    Domain.objects.update_or_create(
        tenant=world.tenant, name="corp.example.test", defaults={"state": Domain.State.VERIFIED, "txt_ok": True}
    )
    return {}


def _sso_body(world: Any) -> dict[str, Any]:
    provider = world.oidc
    return {
        "issuer": provider.issuer,
        "client_id": provider.client_id,
        "client_secret": provider.client_secret,
        "email_domains": ["corp.example.test"],
    }


def _configured_sso(world: Any) -> dict[str, Any]:
    from tenants.access import Principal
    from tenants.services import sso_provider_configure

    _sso_ready(world)
    world.tenant.refresh_from_db()
    sso_provider_configure(principal=Principal.system(world.tenant), **_sso_body(world))
    return {}


def _pool_ready(world: Any) -> dict[str, Any]:
    """The cast's pool exists before the write is counted."""
    pools_of(world)
    return {}


RAW = b"From: a@example.org\r\nTo: inbox@acme.example.test\r\nSubject: upload\r\n\r\nhello\r\n"

WRITES: dict[tuple[str, str], Write] = {
    ("tenant", "PATCH"): Write(body=lambda w: {"name": "Renamed"}, action="tenant.update"),
    ("sso", "PUT"): Write(kwargs=_sso_ready, body=_sso_body, action="sso.configure"),
    ("sso", "DELETE"): Write(kwargs=_configured_sso, action="sso.delete"),
    ("domain-list", "POST"): Write(body=lambda w: {"name": "new.example.test"}, action="domain.create"),
    ("domain-detail", "PATCH"): Write(
        kwargs=lambda w: {"pk": w.domain.pk}, body=lambda w: {"recipient_policy": "drop"}, action="domain.update"
    ),
    ("domain-detail", "DELETE"): Write(kwargs=_empty_domain, action="domain.delete"),
    ("domain-verify", "POST"): Write(kwargs=lambda w: {"pk": w.domain.pk}, action="domain.verify"),
    ("api-key-list", "POST"): Write(
        body=lambda w: {"name": "k", "permissions": ["messages:read"]}, action="api_key.create"
    ),
    ("api-key-detail", "DELETE"): Write(kwargs=_victim_key, action="api_key.revoke"),
    ("api-key-revoke", "POST"): Write(kwargs=_victim_key, action="api_key.revoke"),
    ("mailbox-list", "POST"): Write(body=lambda w: {"address": "fresh@acme.example.test"}, action="mailbox.create"),
    ("mailbox-detail", "PATCH"): Write(
        kwargs=lambda w: {"pk": w.mailbox.pk}, body=lambda w: {"name": "x"}, action="mailbox.update"
    ),
    ("mailbox-detail", "DELETE"): Write(kwargs=lambda w: {"pk": w.sibling.pk}, action="mailbox.delete"),
    ("mailbox-messages-upload", "POST"): Write(
        kwargs=lambda w: {"pk": w.mailbox.pk},
        body=lambda w: RAW,
        content_type="message/rfc822",
        action="message.upload",
    ),
    ("message-detail", "PATCH"): Write(
        kwargs=lambda w: {"pk": w.message.pk}, body=lambda w: {"is_read": True}, action="message.update"
    ),
    ("message-detail", "DELETE"): Write(kwargs=lambda w: {"pk": w.message.pk}, action="message.delete"),
    ("message-rescan", "POST"): Write(kwargs=lambda w: {"pk": w.message.pk}, action="message.rescan"),
    ("connector-list", "POST"): Write(
        body=lambda w: {
            "mailbox": str(w.mailbox.pk),
            "host": "127.0.0.1",
            "port": 9,
            "tls_mode": "none",
            "username": "u",
            "password": "client-secret-for-tests",
        },
        action="connector.create",
    ),
    ("connector-detail", "PATCH"): Write(
        kwargs=lambda w: {"pk": w.connector_id},
        body=lambda w: {"password": "client-secret-for-tests"},
        action="connector.update",
    ),
    ("connector-detail", "DELETE"): Write(kwargs=lambda w: {"pk": w.connector_id}, action="connector.delete"),
    ("connector-test", "POST"): Write(kwargs=lambda w: {"pk": w.connector_id}, action="connector.test"),
    ("connector-resync", "POST"): Write(kwargs=lambda w: {"pk": w.connector_id}, action="connector.resync"),
    ("connector-reconnect", "POST"): Write(kwargs=lambda w: {"pk": w.connector_id}, action="connector.reconnect"),
    ("connector-oauth-initiate", "POST"): Write(
        kwargs=_oauth_connector, body=lambda w: {"connector": str(w.connector_id)}, action="connector.oauth_initiate"
    ),
    ("pool-list", "POST"): Write(
        body=lambda w: {"name": "new pool", "domain": str(w.domain.pk), "size": 2}, action="pool.create"
    ),
    ("pool-detail", "PATCH"): Write(
        kwargs=lambda w: {"pk": pools_of(w).pool.pk}, body=lambda w: {"max_mailboxes": 50}, action="pool.update"
    ),
    ("binding-link-or-create", "POST"): Write(
        kwargs=_pool_ready,
        body=lambda w: {"account_ref": "acct-new", "provider": "openai", "pool": str(pools_of(w).pool.pk)},
        action="binding.create",
    ),
    ("binding-reassign", "POST"): Write(kwargs=lambda w: {"pk": pools_of(w).own.pk}, action="binding.reassign"),
    ("binding-release", "POST"): Write(kwargs=lambda w: {"pk": pools_of(w).own.pk}, action="binding.release"),
    ("provider-list", "POST"): Write(
        body=lambda w: {"name": "openai", "sender_domains": ["openai.com"]}, action="provider.create"
    ),
    ("provider-detail", "PATCH"): Write(
        kwargs=lambda w: {"pk": pools_of(w).provider.pk},
        body=lambda w: {"subject_patterns": ["github.*code"]},
        action="provider.update",
    ),
    ("provider-detail", "DELETE"): Write(kwargs=lambda w: {"pk": pools_of(w).provider.pk}, action="provider.delete"),
    ("webhook-list", "POST"): Write(body=lambda w: {"url": "http://127.0.0.1:9/new"}, action="webhook.create"),
    ("webhook-detail", "PATCH"): Write(
        kwargs=lambda w: {"pk": w.webhook_id}, body=lambda w: {"description": "x"}, action="webhook.update"
    ),
    ("webhook-detail", "DELETE"): Write(kwargs=lambda w: {"pk": w.webhook_id}, action="webhook.delete"),
    ("webhook-rotate-secret", "POST"): Write(kwargs=lambda w: {"pk": w.webhook_id}, action="webhook.rotate_secret"),
    ("webhook-replay", "POST"): Write(
        kwargs=lambda w: {"pk": w.webhook_id}, body=lambda w: {"after": w.mailbox_event_id}, action="webhook.replay"
    ),
    ("message-send", "POST"): Write(body=lambda w: dict(outbound_walks.SEND_BODY), action="message.send"),
    ("dkim-key-list", "POST"): Write(
        kwargs=lambda w: {"domain_id": w.domain.pk}, body=lambda w: {"algorithm": "ed25519"}, action="dkim_key.create"
    ),
    ("dkim-key-detail", "DELETE"): Write(kwargs=outbound_walks.dkim_key_kwargs, action="dkim_key.delete"),
    ("dkim-key-verify", "POST"): Write(kwargs=outbound_walks.dkim_key_kwargs, action="dkim_key.verify"),
    ("domain-sending", "PUT"): Write(
        kwargs=lambda w: {"domain_id": w.domain.pk},
        body=lambda w: {"any_local_part": True},
        action="domain.sending_update",
    ),
    ("suppression-list", "POST"): Write(
        body=lambda w: {"address": "someone@remote.example.org"}, action="suppression.create"
    ),
    ("suppression-detail", "DELETE"): Write(
        kwargs=lambda w: {"pk": outbound_walks.suppression(w).pk}, action="suppression.delete"
    ),
    ("webhook-delivery-retry", "POST"): Write(
        kwargs=lambda w: {"endpoint_id": w.webhook_id, "pk": w.webhook_delivery_id}, action="webhook.retry"
    ),
}

API_WRITES = [
    endpoint
    for endpoint in ENDPOINTS
    if endpoint.method in {"POST", "PUT", "PATCH", "DELETE"} and not endpoint.route.public
]


def test_it_knows_how_to_exercise_every_write_endpoint():
    missing = sorted({(e.name, e.method) for e in API_WRITES} - set(WRITES))
    assert not missing, f"write endpoints missing from WRITES (add how to make them succeed): {missing}"


def _publish_dns(world: Any, zone: Any) -> None:
    # The domain stays verified through the check, so the only entry is the request's own.
    zone.set(world.domain.name, "TXT", [world.domain.verification_record])
    zone.set(world.domain.name, "MX", [(10, "mx1.mailplatform.test.")])


@pytest.mark.parametrize(
    "endpoint", [e for e in API_WRITES if (e.name, e.method) in WRITES], ids=lambda e: f"{e.method} {e.name}"
)
def test_it_audits_each_write_exactly_once_without_secrets(cast, endpoint, dns_zone, request):
    write = WRITES[(endpoint.name, endpoint.method)]
    if endpoint.name == "sso":
        cast.oidc = request.getfixturevalue("oidc_provider")
    if endpoint.name == "message-rescan":  # a real clamd to scan with
        request.getfixturevalue("settings").CLAMD_URL = request.getfixturevalue("clamd_server").tcp_url
    _publish_dns(cast, dns_zone)
    kwargs = write.kwargs(cast)
    client = cast.client(cast.owner_key)
    client.get("/api/v1/tenant/")  # the key's first use from this address is audited on its own
    before = set(AuditEntry.objects.values_list("pk", flat=True))
    body = write.body(cast)
    payload = body if isinstance(body, bytes) else json.dumps(body)
    response = client.generic(
        endpoint.method, reverse(endpoint.name, kwargs=kwargs or None), payload, write.content_type
    )
    assert response.status_code < 300, response.content[:500]
    new = list(AuditEntry.objects.exclude(pk__in=before))
    assert [entry.action for entry in new] == [write.action]
    entry = new[0]
    assert entry.actor_type == "api_key"
    assert entry.correlation_id
    recorded = json.dumps([entry.before, entry.after, entry.actor_label], default=str)
    secrets = [cast.owner_key, cast.owner_key[3:], "client-secret-for-tests"]
    if response.get("Content-Type", "").startswith("application/json") and response.content:
        returned = response.json()
        if isinstance(returned, dict) and isinstance(returned.get("key"), str):
            secrets.append(returned["key"])
    for secret in secrets:
        assert secret not in recorded
