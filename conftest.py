"""Suite-wide fixtures: real PostgreSQL, Redis and an S3 server (SeaweedFS) for every test.

`make test` starts PostgreSQL, Redis and RabbitMQ if they are down (scripts/services.sh);
this file refuses to run against a missing one with a message saying which.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from django.conf import settings
from django.test.utils import override_settings
from jwt.algorithms import RSAAlgorithm

from mailplatform.testing import S3Server, free_port, start_seaweedfs, storages_setting, wait_for_port


def _reachable(url: str, default_port: int) -> tuple[bool, str]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=2):
            return True, f"{host}:{port}"
    except OSError:
        return False, f"{host}:{port}"


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = []
    database = os.environ.get("DATABASE_URL", "")
    if database.startswith("postgres"):
        ok, where = _reachable(database, 5432)
        if not ok:
            missing.append(f"PostgreSQL at {where} (DATABASE_URL)")
    broker = os.environ.get("CELERY_BROKER_URL", "")
    if broker.startswith("redis"):
        ok, where = _reachable(broker, 6379)
        if not ok:
            missing.append(f"Redis at {where} (CELERY_BROKER_URL)")
    if missing:
        pytest.exit("Not reachable: " + "; ".join(missing) + ". Run `make services` (or `make test`).", returncode=3)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_seaweedfs()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _blob_storage_on_s3(s3_server: S3Server) -> Iterator[None]:
    """Every test stores blobs in the real S3 server; subprocesses get the same through S3_*."""
    previous = {name: os.environ.get(name) for name in s3_server.env()}
    os.environ.update(s3_server.env())
    with override_settings(STORAGES=storages_setting(s3_server, settings.STORAGES), S3_BUCKET=s3_server.bucket):
        yield
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _cache_of_its_own(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test counts rate limits afresh, in this process and in the processes it starts.

    Redis outlives a run and is shared by runs side by side: a key prefix of the test's own
    (CACHE_KEY_PREFIX for children) keeps counters left by anyone else out of its way.
    """
    prefix = f"mp-test-{uuid.uuid4().hex[:16]}"
    monkeypatch.setenv("CACHE_KEY_PREFIX", prefix)
    caches = {name: {**options, "KEY_PREFIX": prefix} for name, options in settings.CACHES.items()}
    with override_settings(CACHES=caches):
        yield


@pytest.fixture(scope="session", autouse=True)
def _waiting_queries_in_the_test_thread() -> Iterator[None]:
    """The in-process client must see the test's transaction (child processes keep the pool)."""
    with override_settings(WAITING_DB_THREADS=0):
        yield


# --- The shared cast: one tenant with an owner, a member and a viewer, and an outsider ---
@dataclass
class World:
    """Tenant A with people and keys of each kind, and tenant B, the outsider."""

    tenant: Any
    domain: Any
    mailbox: Any
    sibling: Any  # a second mailbox on the same domain
    owner: Any
    member: Any
    viewer: Any
    outsider_tenant: Any
    outsider_domain: Any
    outsider_mailbox: Any
    owner_key: str = ""
    outsider_key: str = ""
    keys: dict[str, str] = field(default_factory=dict)

    def key(
        self, permissions: Any = None, *, domains: Any = (), mailboxes: Any = (), tenant: Any = None, name: str = "test"
    ) -> str:
        """Mint a key in tenant A (or ``tenant``) and return its secret."""
        from tenants.access import ALL_PERMISSIONS, Principal
        from tenants.services import api_key_mint

        principal = Principal.system(tenant or self.tenant)
        _, secret = api_key_mint(
            principal=principal,
            name=name,
            permissions=ALL_PERMISSIONS if permissions is None else permissions,
            domains=domains,
            mailboxes=mailboxes,
        )
        return secret

    def client(self, secret: str | None = None) -> Any:
        from rest_framework.test import APIClient

        client = APIClient()
        if secret:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
        return client


@pytest.fixture
def world(db: Any) -> World:
    from mailboxes.tests.factories import MailboxFactory
    from tenants.models import Membership
    from tenants.tests.factories import DomainFactory, MembershipFactory, TenantFactory

    tenant = TenantFactory(name="Acme")
    domain = DomainFactory(tenant=tenant, name="acme.example.test")
    outsider_tenant = TenantFactory(name="Outsider")
    outsider_domain = DomainFactory(tenant=outsider_tenant, name="outsider.example.test")
    built = World(
        tenant=tenant,
        domain=domain,
        mailbox=MailboxFactory(domain=domain, local_part="inbox"),
        sibling=MailboxFactory(domain=domain, local_part="sibling"),
        owner=MembershipFactory(tenant=tenant, role=Membership.Role.OWNER).user,
        member=MembershipFactory(tenant=tenant, role=Membership.Role.MEMBER).user,
        viewer=MembershipFactory(tenant=tenant, role=Membership.Role.VIEWER).user,
        outsider_tenant=outsider_tenant,
        outsider_domain=outsider_domain,
        outsider_mailbox=MailboxFactory(domain=outsider_domain, local_part="theirs"),
    )
    built.owner_key = built.key(name="owner key")
    built.outsider_key = built.key(tenant=outsider_tenant, name="outsider key")
    return built


@pytest.fixture
def cast(world: Any, dns_zone: Any) -> Any:
    """The world plus a key to be a victim and events pinned to each mailbox (for route walks)."""
    from audit.services import event_record
    from tenants.access import Principal
    from tenants.models import ApiKey
    from webhooks.models import Delivery
    from webhooks.services import endpoint_create

    world.key(["messages:read"], name="victim")
    world.victim_key_id = ApiKey.objects.get(tenant=world.tenant, name="victim").pk
    webhook, _ = endpoint_create(principal=Principal.system(world.tenant), url="http://127.0.0.1:9/hook")
    world.webhook_id = webhook.pk
    world.mailbox_event_id = event_record(
        tenant_id=world.tenant.pk, type="test.event", mailbox_id=world.mailbox.pk, domain_id=world.domain.pk
    ).public_id
    world.sibling_event_id = event_record(
        tenant_id=world.tenant.pk, type="test.event", mailbox_id=world.sibling.pk, domain_id=world.domain.pk
    ).public_id
    world.webhook_delivery_id = Delivery.objects.get(endpoint=webhook, event__public_id=world.mailbox_event_id).pk
    # An IMAP connector into each mailbox (connectors routes); port 9 refuses connections.
    from ingest.models import Connector

    world.connector_id, world.sibling_connector_id = (
        Connector.objects.create(
            tenant=world.tenant, mailbox=mailbox, host="127.0.0.1", port=9, tls_mode="none", username="u",
            password_encrypted="", auth_type="password", folders=["INBOX"],
        ).pk
        for mailbox in (world.mailbox, world.sibling)
    )  # fmt: skip
    # A parsed, indexed message with a code and an attachment in each mailbox (messages routes).
    from mailboxes.tests.helpers import fixture_bytes, message_deliver

    raw = fixture_bytes("cast_message.eml")
    world.message = message_deliver(world.mailbox, raw)
    world.sibling_message = message_deliver(world.sibling, raw)
    world.outsider_message = message_deliver(world.outsider_mailbox, raw)
    world.attachment_id = world.message.attachments.get().pk
    world.sibling_attachment_id = world.sibling_message.attachments.get().pk
    return world


@pytest.fixture(scope="session")
def _dns_zone() -> Iterator[Any]:
    from mailplatform.testing import Zone

    zone = Zone()
    yield zone
    zone.stop()


@pytest.fixture
def dns_zone(_dns_zone: Any, settings: Any) -> Any:
    """A real authoritative DNS server the domain checks ask (records reset per test)."""
    _dns_zone.records.clear()
    settings.DNS_RESOLVERS = [("127.0.0.1", _dns_zone.port)]
    settings.DNS_TIMEOUT = 2
    settings.MX_HOSTS = ["mx1.mailplatform.test", "mx2.mailplatform.test"]
    return _dns_zone


# --- A real OpenID provider (Node's oidc-provider) on loopback, for single sign-on ------------
PROVIDER_DIR = Path(__file__).resolve().parent / "scripts" / "oidc-provider"
ACCOUNTS = {
    "alice@corp.example.test": {"name": "Alice", "groups": ["mail-admins"]},
    "bob@corp.example.test": {"name": "Bob", "groups": []},
    "eve@corp.example.test": {"email": "eve@elsewhere.example.test"},
    "unverified@corp.example.test": {"email_verified": False},
}


@dataclass
class OidcProvider:
    issuer: str
    client_id: str
    client_secret: str
    private_key: Any
    kid: str


@contextmanager
def oidc_provider_running(redirect_uri: str) -> Iterator[OidcProvider]:
    """One oidc-provider process on loopback whose one client may come back to ``redirect_uri``."""
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").exists():
        pytest.fail("the test OpenID provider is not installed: run scripts/install-oidc-provider.sh (make test does)")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key))
    jwk.update({"kid": "test-key-1", "alg": "RS256", "use": "sig"})
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    provider = OidcProvider(issuer, "mailplatform-test", "client-secret-for-tests", key, "test-key-1")
    env = {
        **os.environ,
        "ISSUER": issuer,
        "PORT": str(port),
        "CLIENT_ID": provider.client_id,
        "CLIENT_SECRET": provider.client_secret,
        "REDIRECT_URI": redirect_uri,
        "JWKS": json.dumps({"keys": [jwk]}),
        "ACCOUNTS": json.dumps(ACCOUNTS),
        "NODE_ENV": "test",
    }
    process = subprocess.Popen(
        ["node", "provider.mjs"], cwd=PROVIDER_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=20)
        yield provider
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def oidc_provider() -> Iterator[OidcProvider]:
    """The provider for the test client (BASE_URL http://testserver)."""
    with oidc_provider_running("http://testserver/login/sso/callback/") as provider:
        yield provider


@pytest.fixture(scope="session")
def oidc_provider_live(live_server: Any) -> Iterator[OidcProvider]:
    """A second provider whose client comes back to the live server (browser tests)."""
    with oidc_provider_running(f"{live_server.url}/login/sso/callback/") as provider:
        yield provider


# --- Real processes against the test database (end-to-end tests) -------------------------
@pytest.fixture(scope="session", autouse=True)
def _children_gone_before_the_database_is_dropped(django_db_setup: Any, django_db_blocker: Any) -> Iterator[None]:
    """A stopped child's backends end asynchronously; the test database is dropped only after."""
    yield
    from mailboxes.waiting import pool_close
    from mailplatform.testing import database_sessions_wait_gone

    pool_close()  # in-process waiters keep pooled connections open between requests
    with django_db_blocker.unblock():
        try:
            database_sessions_wait_gone()
        except TimeoutError as error:
            warnings.warn(str(error), stacklevel=1)


@pytest.fixture
def live_env(transactional_db: Any) -> dict[str, str]:
    """The environment a child process needs to share this test's database, broker and S3."""
    from django.db import connection

    from mailplatform.testing import database_url_of, env_with

    return env_with(DATABASE_URL=database_url_of(connection.settings_dict), LOG_LEVEL="WARNING")


@pytest.fixture
def web_server(live_env: dict[str, str]) -> Iterator[str]:
    """uvicorn serving mailplatform.asgi (one process) on the test database; yields its URL."""
    from mailplatform.testing import start_uvicorn

    server = start_uvicorn(env=live_env)
    yield server.url
    server.stop()


@pytest.fixture
def celery_worker(live_env: dict[str, str]) -> Iterator[Any]:
    """A real Celery worker on every queue (the broker of CELERY_BROKER_URL), on the test database."""
    from mailplatform.testing import ALL_QUEUES, start_celery_worker

    worker = start_celery_worker(queue=ALL_QUEUES, name="all", env=live_env)
    yield worker
    worker.stop()


@pytest.fixture
def runsmtp(live_env: dict[str, str], tmp_path: Any) -> Iterator[Any]:
    """A factory of ``manage.py runsmtp`` processes on the test database: ``runsmtp(**env).start()``."""
    from mailplatform.testing import RunsmtpProcess, free_port

    made: list[RunsmtpProcess] = []

    def make(**extra_env: str) -> RunsmtpProcess:
        env = {
            **live_env,
            "SPOOL_DIR": str(tmp_path / "spool"),
            "INGEST_WORKERS": "1",
            "INGEST_DIRECTORY_REFRESH": "1",
            "INGEST_METRICS_PORT": "0",
            "LOG_LEVEL": "INFO",
            **extra_env,
        }
        process = RunsmtpProcess(port=free_port(), spool_dir=tmp_path / "spool", env=env)
        made.append(process)
        return process

    yield make
    for process in made:
        process.stop()


@pytest.fixture
def pipeline_queues_empty() -> Iterator[None]:
    """The broker's parse and index queues empty, as after a broker restart that lost them
    (earlier tests leave tasks there that no worker consumed)."""
    from mailplatform.queues import queue_purge

    for name in ("parse", "index"):
        queue_purge(name)
    yield
    for name in ("parse", "index"):
        queue_purge(name)


# A real clamd (Debian's) for the antivirus tests and the audit walk, one per session: its tiny
# EICAR database loads in well under a second; tests that stop it start it again on the same port.
@pytest.fixture(scope="session")
def clamd_server() -> Iterator[Any]:
    from mailplatform.testing_clamd import ClamdServer

    server = ClamdServer(stream_max_length="256K").start()
    yield server
    server.stop()
