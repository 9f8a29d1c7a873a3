"""The web in a real browser: Playwright for Python driving Debian's Chromium against a live
server, with the real SMTP server (runsmtp) and a real Celery worker parsing the mail.

Opt out with SKIP_BROWSER_TESTS=1 (nothing else skips them). Set SCREENSHOT_DIR to write the
README's screenshots (docs/screenshots/).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.conf import settings as django_settings
from django.core import mail
from django.db import connection, connections

from mailplatform.testing import ChildProcess, free_port, start_celery_worker, wait_for_port
from webinbox.services import outbound_flush

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(os.environ.get("SKIP_BROWSER_TESTS") == "1", reason="SKIP_BROWSER_TESTS=1"),
]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _database_url() -> str:
    params = connection.settings_dict
    password = f":{params['PASSWORD']}" if params.get("PASSWORD") else ""
    return (
        f"postgres://{params.get('USER') or 'postgres'}{password}@{params.get('HOST') or '127.0.0.1'}:"
        f"{params.get('PORT') or 5432}/{params['NAME']}"
    )


@pytest.fixture
def browser(monkeypatch: Any) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-browser.sh (make test does)")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread; the ORM calls the tests make
    # between browser steps are ordinary synchronous code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()
            # Django keeps connections per context (asgiref Local over contextvars), and the
            # code run while Playwright drives this thread got connections of its own: close
            # them here, or they outlive the test and keep the test database from being dropped.
            connections.close_all()


@pytest.fixture
def site(live_server: Any, settings: Any) -> str:
    settings.BASE_URL = live_server.url  # sign-in links and inbox URLs point at the live server
    return str(live_server.url)


@pytest.fixture
def mail_pipeline(tmp_path: Path) -> Iterator[int]:
    """runsmtp on a free port and a Celery worker for parse and index, on the test database."""
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": _database_url(),
            "SPOOL_DIR": str(tmp_path / "spool"),
            "INGEST_WORKERS": "1",
            "INGEST_DIRECTORY_REFRESH": "1",
            "INGEST_METRICS_PORT": "0",
            "LOG_LEVEL": "INFO",
        }
    )
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    port = free_port()
    log = (tmp_path / "runsmtp.log").open("wb")
    smtp = subprocess.Popen(
        [sys.executable, "manage.py", "runsmtp", "--port", str(port), "--metrics-port", "0"],
        cwd=django_settings.BASE_DIR,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker: ChildProcess | None = None
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        worker = start_celery_worker(queue="parse,index", env=env)
        yield port
    finally:
        if worker is not None:
            worker.stop()
        if smtp.poll() is None:
            os.killpg(smtp.pid, signal.SIGTERM)
            try:
                smtp.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(smtp.pid, signal.SIGKILL)
                smtp.wait(10)
        log.close()


def _shot(page: Any, name: str) -> None:
    directory = os.environ.get("SCREENSHOT_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(directory) / f"{name}.png"), full_page=False)


def _send(port: int, sender: str, recipient: str, raw: bytes, timeout: float = 20.0) -> None:
    """Send through runsmtp; its recipient directory may need a moment to learn a new address."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail(sender, [recipient], raw)
            return
        except smtplib.SMTPRecipientsRefused:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_it_receives_mail_in_a_temporary_inbox_live(browser: Any, site: str, mail_pipeline: int) -> None:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 800})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=site)
    page = context.new_page()
    page.goto(site + "/")
    _shot(page, "home")
    page.get_by_role("button", name="New temporary inbox").click()
    page.wait_for_url(re.compile(r".*/t/[^/]+/$"))
    address = page.locator("#address").inner_text().strip()
    assert address.endswith("@" + django_settings.TEMP_INBOX_DOMAIN)
    assert "No mail yet" in page.content()

    raw = (
        f"From: Shop <noreply@shop.example>\r\nTo: {address}\r\nSubject: Your login code\r\n"
        "Message-ID: <browser-test@shop.example>\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        "<p>Hello!</p><p>Your verification code is <b>739154</b>.</p>"
        '<p><a href="https://shop.example/confirm?t=1">Confirm</a></p><script>alert(1)</script>\r\n'
    ).encode()
    _send(mail_pipeline, "noreply@shop.example", address, raw)
    # No reload: the list polls and shows the message once it is parsed.
    subject = page.locator(".messages .subject", has_text="Your login code")
    subject.wait_for(timeout=45_000)
    _shot(page, "temporary-inbox")
    subject.click()
    page.wait_for_url(re.compile(r".*/m/[^/]+/$"))
    code = page.locator("[data-code]").first
    assert code.inner_text() == "739154"
    page.get_by_role("button", name="Copy code").click()
    page.get_by_role("button", name="Copied").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == "739154"
    frame = page.frame_locator("iframe.body")
    assert "verification code" in frame.locator("body").inner_text()
    _shot(page, "message")
    with page.expect_download() as waiting:
        page.locator("#download-raw").click()
    download = waiting.value
    assert hashlib.sha256(Path(download.path()).read_bytes()).hexdigest() == hashlib.sha256(raw).hexdigest()
    context.close()


def test_it_signs_in_by_magic_link_and_mints_a_key_that_works(browser: Any, site: str, world: Any) -> None:
    from mailboxes.tests.helpers import fixture_bytes, message_deliver, simple_message

    message_deliver(world.mailbox, simple_message("Quarterly report", "Numbers attached."))
    message_deliver(world.mailbox, fixture_bytes("verification_code.eml"))
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(site + "/login/")
    page.get_by_label("Work e-mail address").fill(world.owner.email)
    page.get_by_role("button", name="E-mail me a sign-in link").click()
    page.get_by_role("heading", name="Check your inbox").wait_for()
    outbound_flush()
    link = re.search(r"http://\S+/login/link/\S+/", mail.outbox[-1].body)
    assert link and link.group(0).startswith(site)
    page.goto(link.group(0))
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(site + "/inbox/")
    page.locator(".messages .subject", has_text="Quarterly report").wait_for()
    _shot(page, "inbox")

    page.goto(f"{site}/console/{world.tenant.slug}/keys/")
    page.get_by_label("Name", exact=True).fill("browser key")
    page.get_by_label("messages:read").check()
    page.get_by_role("button", name="Mint key").click()
    secret = page.locator("#new-key").inner_text().strip()
    assert secret.startswith("mp_")
    _shot(page, "console-keys")
    api = requests.get(
        f"{site}/api/v1/messages/", params={"mailbox": str(world.mailbox.pk)},
        headers={"Authorization": f"Bearer {secret}"}, timeout=10,
    )  # fmt: skip
    assert api.status_code == 200, api.text
    assert {"Quarterly report", "Your verification code"} <= {item["subject"] for item in api.json()["results"]}
    page.reload()
    assert secret not in page.content()  # shown once
    # Phone-sized console and the dark scheme, for the README.
    phone = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark")
    phone.add_cookies(context.cookies())
    mobile = phone.new_page()
    mobile.goto(f"{site}/console/{world.tenant.slug}/domains/")
    _shot(mobile, "console-phone-dark")
    phone.close()
    context.close()


def test_it_renders_the_api_docs_offline(browser: Any, site: str) -> None:
    context = browser.new_context()
    page = context.new_page()
    elsewhere: list[str] = []

    def same_origin_only(route: Any) -> None:
        # Offline: anything not from our own origin fails, as it would without a network.
        if route.request.url.startswith(site + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", same_origin_only)
    refused: list[str] = []
    page.on(
        "console", lambda message: refused.append(message.text) if "Content Security Policy" in message.text else None
    )
    page.goto(site + "/api/v1/docs/")
    page.locator(".opblock-summary-path", has_text="/api/v1/messages/").first.wait_for(timeout=20_000)
    assert page.locator(".opblock").count() > 20
    assert elsewhere == [] and refused == []
    context.close()


def test_it_signs_in_through_the_companys_sso_from_the_login_form(
    browser: Any, site: str, world: Any, oidc_provider_live: Any
) -> None:
    """/login/ -> the tenant's own provider (a real oidc-provider) -> back, signed in to that tenant.

    Chromium applies the sign-in page's ``form-action 'self'`` to every redirect that follows
    the form's submission, so the way to the provider must not be a redirect chain from it.
    """
    from tenants.access import Principal
    from tenants.models import Tenant
    from tenants.services import sso_provider_configure
    from tenants.tests.test_sso import verified_domain

    world.tenant.plan = Tenant.Plan.ENTERPRISE
    world.tenant.save()
    verified_domain(world.tenant, "corp.example.test")
    sso_provider_configure(
        principal=Principal.system(world.tenant),
        issuer=oidc_provider_live.issuer,
        client_id=oidc_provider_live.client_id,
        client_secret=oidc_provider_live.client_secret,
        email_domains=["corp.example.test"],
    )
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    blocked: list[str] = []
    page.on(
        "console", lambda message: blocked.append(message.text) if "Content Security Policy" in message.text else None
    )
    page.goto(site + "/login/")
    page.get_by_label("Work e-mail address").fill("alice@corp.example.test")
    page.get_by_role("button", name="E-mail me a sign-in link").click()
    # The provider's own sign-in form (oidc-provider's development interactions).
    page.wait_for_url(oidc_provider_live.issuer + "/**", timeout=15_000)
    page.locator("input[name=login]").fill("alice@corp.example.test")
    page.locator("input[name=password]").fill("any")
    page.locator("button[type=submit]").click()
    page.wait_for_url(site + "/inbox/", timeout=15_000)
    assert world.tenant.name in page.content()
    assert blocked == []
    context.close()
