"""Security headers on every page, and a production configuration that passes check --deploy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.test import Client

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("path", ["/", "/login/", "/inbox/", "/console/", "/t/nope/", "/no/such/page/", "/healthz"])
def test_it_sends_a_strict_content_security_policy_on_every_page(world: Any, signed_in: Any, path: str) -> None:
    for client in (Client(), signed_in("owner")):
        response = client.get(path)
        policy = response["Content-Security-Policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, path
        assert "'unsafe-inline'" not in policy.split("script-src", 1)[1].split(";")[0]
        assert response["X-Frame-Options"] == "DENY"
        assert response["X-Content-Type-Options"] == "nosniff"


def test_it_keeps_session_and_csrf_cookies_http_only(world: Any) -> None:
    assert django_settings.SESSION_COOKIE_HTTPONLY and django_settings.CSRF_COOKIE_HTTPONLY
    from webinbox.services import login_link_create

    client = Client()
    client.post(login_link_create(user=world.owner).split("testserver", 1)[1])
    assert client.cookies["sessionid"]["httponly"]


def test_it_passes_check_deploy_with_production_settings(tmp_path: Any) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DJANGO_", "S3_")) and key not in {"BASE_URL", "ALLOWED_HOSTS"}
    }
    env.update(
        {
            "DEBUG": "false",
            "BASE_URL": "https://mail.example.com",
            "SECRET_KEY": "k" * 20 + "Z9%q!x" * 10,
            "API_KEY_PEPPER": "p" * 20 + "Y8%w?z" * 10,
            "DATA_DIR": str(tmp_path),
            "EMAIL_URL": "smtp://relay.example.com:587",
        }
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=django_settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def _directive(policy: str, name: str) -> str:
    for part in policy.split(";"):
        words = part.split()
        if words and words[0] == name:
            return " ".join(words[1:])
    return ""


def test_it_serves_the_api_docs_from_its_own_origin() -> None:
    client = Client()
    page = client.get("/api/v1/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    # Every asset is a same-origin path, and no script is inline (the init script is a file too).
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(assets) >= 4, assets
    for asset in assets:
        assert asset.startswith("/") and not asset.startswith("//"), asset
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline script"
    assert "<style" not in html and " style=" not in html
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200, asset
        body = b"".join(response.streaming_content) if response.streaming else response.content
        assert body, asset
    init = client.get(next(asset for asset in assets if "script" in asset))
    assert init["Content-Type"].startswith("application/javascript")
    assert "SwaggerUIBundle(" in init.content.decode()
    policy = page["Content-Security-Policy"]
    assert "cdn" not in policy and "https:" not in policy and "http:" not in policy
    for directive in ("script-src", "style-src"):
        assert _directive(policy, directive) == "'self'", (directive, policy)
    assert _directive(policy, "object-src") == "'none'" and _directive(policy, "frame-ancestors") == "'none'"


def test_it_answers_every_missing_page_with_the_same_styled_404(world: Any, signed_in: Any, settings: Any) -> None:
    settings.DEBUG = False
    member = signed_in("owner")
    answers = [
        Client().get("/no/such/page/"),
        member.get("/no/such/page/"),
        member.get("/inbox/no-such-tenant/"),
        member.get(f"/inbox/{world.tenant.slug}/m/00000000-0000-0000-0000-000000000000/"),
        member.get(f"/inbox/{world.tenant.slug}/mailboxes/not-a-uuid/"),
        member.get("/console/no-such-tenant/"),
        member.get(f"/console/{world.outsider_tenant.slug}/keys/"),
    ]
    for answer in answers:
        html = answer.content.decode()
        assert answer.status_code == 404
        assert "mailplatform.css" in html and "<h1>Page not found</h1>" in html, html[:300]
    # JSON under /api/ as before.
    assert Client().get("/api/v1/nothing/").json()["error"]["code"] == "not_found"
