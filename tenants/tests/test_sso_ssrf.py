"""SSRF through the SSO issuer: discovery, token, JWKS and userinfo calls go through the shared
SSRF-safe transport, and the tenant only ever sees one generic error code.

The address matrix runs with OUTBOUND_ALLOW_PRIVATE off (plain http and the listeners' ports
allowed, so only the address rule can refuse); a listener on loopback proves nothing arrived.
Redirects, oversized documents and slow providers need a server the test can reach, so those
run against loopback with the switch on: the rules they test hold either way.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from django.utils import timezone

from audit.models import AuditEntry
from tenants import crypto, sso
from tenants.models import SsoProvider, Tenant
from tenants.tests.test_sso import verified_domain
from webhooks.tests.conftest import Receiver, Scripted, loopback_receivers

pytestmark = pytest.mark.django_db

GENERIC = "sso_provider_unreachable"
HOSTS = [
    "127.0.0.1",
    "10.0.0.1",
    "169.254.169.254",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[64:ff9b::7f00:1]",
    "[2002:7f00:1::]",
    "localhost",
]
# What the tenant must never read back: the fetched document, the exception's type.
LEAKS = ("Error", "Timeout", "Exception", "internal-secret", "127.0.0.1", "10.0.0.1", "169.254")


@pytest.fixture
def enterprise(world):
    world.tenant.plan = Tenant.Plan.ENTERPRISE
    world.tenant.save()
    verified_domain(world.tenant, "corp.example.test")
    return world


@pytest.fixture
def listeners() -> Iterator[list[Receiver]]:
    yield from loopback_receivers()


@pytest.fixture
def strict(listeners, settings):
    settings.OUTBOUND_ALLOW_PRIVATE = False
    settings.OUTBOUND_ALLOW_HTTP = True
    settings.OUTBOUND_EXTRA_PORTS = [server.port for server in listeners]
    settings.SSO_HTTP_TIMEOUT = 1


def _configure(world, issuer):
    payload = {
        "issuer": issuer,
        "client_id": "mailplatform",
        "client_secret": "s3cret",
        "email_domains": ["corp.example.test"],
    }
    return world.client(world.owner_key).put("/api/v1/sso/", payload, format="json")


def _assert_generic(response):
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == GENERIC, error
    text = json.dumps(error)
    for leak in LEAKS:
        assert leak not in text, (leak, text)


@pytest.mark.parametrize("host", HOSTS)
def test_it_refuses_an_issuer_on_a_non_public_address(enterprise, listeners, strict, host):
    for listener in listeners:
        issuer = f"http://{host}:{listener.port}"
        _assert_generic(_configure(enterprise, issuer))
    assert not SsoProvider.objects.exists()
    assert all(listener.received == [] for listener in listeners)


def test_it_does_reach_the_listener_when_private_addresses_are_allowed(enterprise, listeners, settings):
    """The matrix's control: the same listener is reachable, so silence above means refusal."""
    settings.OUTBOUND_ALLOW_PRIVATE = True
    _configure(enterprise, listeners[0].url(path="", host="localhost"))
    assert len(listeners[0].wait_for(1)) == 1


def _stored_provider(world, base):
    """A provider whose cached discovery sends the token, JWKS and userinfo calls to ``base``
    (as if the document had been fetched while DNS said otherwise)."""
    issuer = "https://idp.corp.example.test"
    return SsoProvider.objects.create(
        tenant=world.tenant,
        issuer=issuer,
        client_id="mailplatform",
        client_secret_encrypted=crypto.encrypt("s3cret"),
        discovery={
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/auth",
            "token_endpoint": f"{base}/token",
            "jwks_uri": f"{base}/jwks",
            "userinfo_endpoint": f"{base}/userinfo",
        },
        discovery_fetched_at=timezone.now(),
    )


@pytest.mark.parametrize("call", ["token", "jwks", "userinfo"])
def test_it_sends_nothing_to_a_token_jwks_or_userinfo_endpoint_on_a_private_address(
    enterprise, listeners, strict, call
):
    provider = _stored_provider(enterprise, listeners[0].url(path=""))
    backend = sso.TenantOIDCBackend(provider)
    calls = {
        "token": lambda: backend.get_token({"client_secret": "s3cret", "code": "x"}),
        "jwks": lambda: backend.retrieve_matching_jwk("eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.e30.sig"),
        "userinfo": lambda: backend.get_userinfo("access-token", "id-token", {"sub": "alice"}),
    }
    with pytest.raises(sso.SsoError) as refused:
        calls[call]()
    assert refused.value.code == GENERIC
    assert listeners[0].received == []


def test_it_refuses_a_callback_whose_token_endpoint_is_private_and_audits_only_the_code(
    client, enterprise, listeners, strict
):
    provider = _stored_provider(enterprise, listeners[0].url(path=""))
    session = client.session
    session["sso_flows"] = {
        "st": {"provider": str(provider.pk), "nonce": "n", "verifier": "v", "next": "/inbox/", "started": time.time()}
    }
    session.save()
    response = client.get("/login/sso/callback/", {"code": "c", "state": "st"})
    assert response.status_code == 403
    assert "_auth_user_id" not in client.session
    assert listeners[0].received == []  # the client secret never went to the internal address
    entry = AuditEntry.objects.get(action="auth.login_failed", tenant_id=enterprise.tenant.pk)
    assert entry.after["reason"] == GENERIC


def test_it_does_not_follow_a_redirect_to_loopback(enterprise, listeners, settings):
    settings.OUTBOUND_ALLOW_PRIVATE = True
    settings.SSO_HTTP_TIMEOUT = 2
    redirector = Receiver()
    try:
        internal = listeners[0].url("/.well-known/openid-configuration")
        redirector.respond(Scripted(302, headers={"Location": internal}))
        _assert_generic(_configure(enterprise, redirector.url(path="")))
        assert len(redirector.wait_for(1)) == 1
    finally:
        redirector.close()
    assert listeners[0].received == []


def test_it_refuses_an_oversized_document(enterprise, settings):
    settings.OUTBOUND_ALLOW_PRIVATE = True
    settings.SSO_DOCUMENT_LIMIT = 4096
    server = Receiver()
    try:
        issuer = server.url(path="")
        document = {
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/auth",
            "token_endpoint": f"{issuer}/token",
            "jwks_uri": f"{issuer}/jwks",
            "padding": "internal-secret" * 1000,
        }
        server.respond(Scripted(200, headers={"Content-Type": "application/json"}, body=json.dumps(document).encode()))
        _assert_generic(_configure(enterprise, issuer))
    finally:
        server.close()


def test_it_does_not_echo_a_mismatched_issuer(enterprise, settings):
    settings.OUTBOUND_ALLOW_PRIVATE = True
    server = Receiver()
    try:
        issuer = server.url(path="")
        document = {"issuer": "http://internal-secret.example/", "authorization_endpoint": "x"}
        server.respond(Scripted(200, headers={"Content-Type": "application/json"}, body=json.dumps(document).encode()))
        _assert_generic(_configure(enterprise, issuer))
    finally:
        server.close()


class Trickle:
    """Answers 200 and then one byte of the body every 0.2 s: slow, but never idle for long."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.server.settimeout(0.2)
        while not self.stop.is_set():
            try:
                connection, _ = self.server.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            try:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
                for _ in range(100):
                    if self.stop.is_set():
                        return
                    connection.sendall(b" ")
                    time.sleep(0.2)
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.server.close()


@pytest.mark.parametrize("kind", ["silent", "trickling"])
def test_it_gives_up_on_a_slow_provider_within_the_timeout(enterprise, settings, kind):
    settings.OUTBOUND_ALLOW_PRIVATE = True
    settings.SSO_HTTP_TIMEOUT = 1
    if kind == "silent":
        server = Receiver()
        server.respond(Scripted(200, body=b"{}", delay=4))
        issuer, close = server.url(path=""), server.close
    else:
        trickle = Trickle()
        issuer, close = f"http://127.0.0.1:{trickle.port}", trickle.close
    try:
        started = time.monotonic()
        _assert_generic(_configure(enterprise, issuer))
        assert time.monotonic() - started < 3
    finally:
        close()


@pytest.mark.parametrize("endpoint", ["javascript:alert(1)", "file:///etc/passwd", "ftp://idp.example/auth"])
def test_it_refuses_a_document_whose_endpoints_are_not_web_urls(enterprise, settings, endpoint):
    settings.OUTBOUND_ALLOW_PRIVATE = True
    server = Receiver()
    try:
        issuer = server.url(path="")
        document = {
            "issuer": issuer,
            "authorization_endpoint": endpoint,
            "token_endpoint": f"{issuer}/token",
            "jwks_uri": f"{issuer}/jwks",
        }
        server.respond(Scripted(200, headers={"Content-Type": "application/json"}, body=json.dumps(document).encode()))
        _assert_generic(_configure(enterprise, issuer))
    finally:
        server.close()
