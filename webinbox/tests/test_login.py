"""Passwordless sign-in: the same answer for everyone, single-use links on BASE_URL, audit, sign-out."""

from __future__ import annotations

import re
import statistics
import time
from datetime import timedelta
from typing import Any

import pytest
from django.core import mail
from django.test import Client
from django.utils import timezone

from audit.models import AuditEntry
from webinbox.models import LoginToken
from webinbox.services import login_link_create, outbound_flush

# Sign-in work runs on a background thread with its own connection: it must see committed rows.
pytestmark = pytest.mark.django_db(transaction=True)

LINK = re.compile(r"https?://\S+/login/link/\S+/")


def _ask(client: Client, email: str) -> Any:
    response = client.post("/login/", {"email": email})
    outbound_flush()
    return response


def _link_from_outbox() -> str:
    assert mail.outbox, "no sign-in mail was sent"
    match = LINK.search(mail.outbox[-1].body)
    assert match
    return match.group(0)


def _trimmed_mean(samples: list[float]) -> float:
    """The mean without the slowest and fastest tenth: the machine is shared, a stray pause is noise."""
    ordered = sorted(samples)
    cut = len(ordered) // 10
    return statistics.mean(ordered[cut : len(ordered) - cut])


def test_it_answers_the_same_bytes_for_a_member_and_an_unknown_address(world: Any) -> None:
    client = Client()
    known = _ask(client, world.owner.email)
    unknown = _ask(client, "nobody@nowhere.example")
    assert known.status_code == unknown.status_code == 200
    assert known.content == unknown.content
    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == [world.owner.email]


def test_it_takes_the_same_time_for_a_member_and_an_unknown_address(world: Any, settings: Any) -> None:
    settings.LOGIN_RATE_PER_ADDRESS = 1000
    settings.LOGIN_RATE_PER_IP = 1000
    client = Client()
    timings: dict[str, list[float]] = {"known": [], "unknown": []}
    for _ in range(3):
        _ask(client, world.owner.email)
        _ask(client, "nobody@nowhere.example")
    for _ in range(50):
        for name, email in (("known", world.owner.email), ("unknown", "nobody@nowhere.example")):
            started = time.perf_counter()
            client.post("/login/", {"email": email})
            timings[name].append(time.perf_counter() - started)
            outbound_flush()  # the background work must not land on the next timed request
    difference = abs(_trimmed_mean(timings["known"]) - _trimmed_mean(timings["unknown"]))
    assert difference < 0.003, (statistics.mean(timings["known"]), statistics.mean(timings["unknown"]))


def test_it_builds_the_link_on_base_url_never_the_host_header(world: Any, settings: Any) -> None:
    settings.BASE_URL = "https://mail.example.test"
    settings.ALLOWED_HOSTS = ["*"]
    Client().post("/login/", {"email": world.owner.email}, HTTP_HOST="evil.example")
    outbound_flush()
    link = _link_from_outbox()
    assert link.startswith("https://mail.example.test/login/link/")
    assert "evil" not in mail.outbox[0].body
    token = link.rstrip("/").rsplit("/", 1)[1]
    assert not LoginToken.objects.filter(token_hash=token).exists()  # stored hashed


def test_it_signs_in_once_with_the_link_and_audits_it(world: Any) -> None:
    browser = Client()
    _ask(browser, world.owner.email)
    path = _link_from_outbox().split("testserver", 1)[1]
    # GET only shows a button, so a link scanner cannot use the link up.
    landing = browser.get(path)
    assert landing.status_code == 302 and landing["Location"] == "/login/link/confirm/"
    assert landing["Referrer-Policy"] == "no-referrer"
    assert Client().get(path).status_code == 302  # a scanner's fetch changes nothing
    assert browser.get("/login/link/confirm/").status_code == 200
    signed_in = browser.post("/login/link/confirm/")
    assert signed_in.status_code == 302 and signed_in["Location"] == "/inbox/"
    assert browser.get("/inbox/").status_code == 200
    assert AuditEntry.objects.filter(action="auth.login", tenant=world.tenant, actor_user=world.owner).count() == 1
    again = Client().post(path)
    assert again.status_code == 404
    assert Client().post("/login/link/confirm/").status_code == 404  # nothing pending
    assert AuditEntry.objects.filter(action="auth.login_failed").count() == 1


def test_it_refuses_an_expired_link(world: Any) -> None:
    url = login_link_create(user=world.member)
    LoginToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    response = Client().post(url.split("testserver", 1)[1])
    assert response.status_code == 404
    assert Client().get("/inbox/").status_code == 302


def test_it_rate_limits_per_address_and_per_ip(world: Any, settings: Any) -> None:
    settings.LOGIN_RATE_PER_ADDRESS = 2
    settings.LOGIN_RATE_PER_IP = 4
    client = Client()
    answers = {_ask(client, world.owner.email).content for _ in range(4)}
    assert len(mail.outbox) == 2
    assert len(answers) == 1  # limited or not, the same page
    _ask(client, world.member.email)  # the IP's 5th request in the window
    assert len(mail.outbox) == 2
    _ask(Client(REMOTE_ADDR="192.0.2.9"), world.member.email)
    assert len(mail.outbox) == 3


def test_it_rejects_a_login_post_without_the_csrf_token(world: Any) -> None:
    client = Client(enforce_csrf_checks=True)
    assert client.post("/login/", {"email": world.owner.email}).status_code == 403
    outbound_flush()
    assert mail.outbox == []


def test_it_never_fails_on_bad_input() -> None:
    client = Client()
    assert client.post("/login/", {"email": "not an address"}).status_code == 400
    assert client.post("/login/", {"email": "x" * 5000 + "@example.test"}).status_code == 400
    assert client.post("/login/link/" + "z" * 300 + "/").status_code == 404


def test_it_signs_out_everywhere(world: Any) -> None:
    laptop, phone = Client(), Client()
    for browser in (laptop, phone):
        _ask(browser, world.owner.email)
        browser.post(_link_from_outbox().split("testserver", 1)[1])
        assert browser.get("/inbox/").status_code == 200
    assert laptop.post("/logout/everywhere/").status_code == 302
    assert phone.get("/inbox/").status_code == 302
    assert laptop.get("/inbox/").status_code == 302
    assert AuditEntry.objects.filter(action="auth.logout_everywhere", tenant=world.tenant).count() == 1
    # A new sign-in works again afterwards.
    _ask(phone, world.owner.email)
    phone.post(_link_from_outbox().split("testserver", 1)[1])
    assert phone.get("/inbox/").status_code == 200


def test_it_keeps_the_sso_decision_in_one_function(world: Any) -> None:
    from webinbox.selectors import sso_tenant_for_email

    assert sso_tenant_for_email(world.owner.email) is None


def test_it_binds_a_requested_link_to_the_browser_that_asked(world: Any) -> None:
    asking = Client()
    _ask(asking, world.owner.email)
    link = _link_from_outbox().split("testserver", 1)[1]
    assert "mp_login_binding" in asking.cookies
    # The link forwarded to (or intercepted by) another browser signs nobody in...
    elsewhere = Client()
    response = elsewhere.post(link)
    assert response.status_code == 404
    assert "_auth_user_id" not in elsewhere.session
    # ...and is not used up by that attempt: the browser that asked still signs in with it.
    response = asking.post(link)
    assert response.status_code == 302
    assert int(asking.session["_auth_user_id"]) == world.owner.pk


def test_it_sets_the_binding_cookie_whatever_the_address(world: Any) -> None:
    known, unknown = Client(), Client()
    _ask(known, world.owner.email)
    _ask(unknown, "nobody@nowhere.example")
    assert "mp_login_binding" in known.cookies
    assert "mp_login_binding" in unknown.cookies
    assert known.cookies["mp_login_binding"]["httponly"]
    assert known.cookies["mp_login_binding"].value != unknown.cookies["mp_login_binding"].value
