"""A real OpenID provider (Node's oidc-provider) on loopback, for the single sign-on tests."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from mailplatform.testing import free_port, wait_for_port

PROVIDER_DIR = Path(__file__).resolve().parents[2] / "scripts" / "oidc-provider"
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


@pytest.fixture(scope="session")
def oidc_provider() -> Iterator[OidcProvider]:
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
        "REDIRECT_URI": "http://testserver/login/sso/callback/",
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
