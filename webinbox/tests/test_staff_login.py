"""The Django admin's password sign-in: throttled per username and per client, and audited."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from django.core import serializers
from django.test import Client

from audit.models import AuditEntry
from mailplatform import ratelimit
from tenants.models import User

PASSWORD = "correct horse battery staple 42"
WRONG = "Tr0ub4dor&3-guess"
LOCKED = "Too many failed sign-in attempts"


@pytest.fixture
def staff(db: Any) -> User:
    return User.objects.create_user(email="operator@mailplatform.test", password=PASSWORD, is_staff=True)


def _sign_in(username: str, password: str, *, ip: str = "127.0.0.1") -> Any:
    client = Client(REMOTE_ADDR=ip)
    answer = client.post("/admin/login/", {"username": username, "password": password, "next": "/admin/"})
    answer.signed_in = client.get("/admin/").status_code == 200
    return answer


def _later(monkeypatch: Any, seconds: float) -> None:
    """The rate-limit counters' clock, moved on (their windows are counted by time.time())."""
    now = time.time() + seconds

    class Clock:
        @staticmethod
        def time() -> float:
            return now

    monkeypatch.setattr(ratelimit, "time", Clock)


def test_it_refuses_even_the_right_password_after_five_failures_until_the_window_ends(
    staff: User, settings: Any, monkeypatch: Any
) -> None:
    settings.STAFF_LOGIN_MAX_FAILURES, settings.STAFF_LOGIN_WINDOW = 5, 900
    for _ in range(5):
        failed = _sign_in(staff.email, WRONG)
        assert failed.status_code == 200 and not failed.signed_in
        assert LOCKED not in failed.content.decode()

    refused = _sign_in(staff.email, PASSWORD)
    assert not refused.signed_in
    assert LOCKED in refused.content.decode()
    # Another client is refused for this username too: the lock is on the account.
    assert not _sign_in(staff.email, PASSWORD, ip="192.0.2.50").signed_in

    # The window slides: the five still weigh on the next clock window, gone two windows on.
    _later(monkeypatch, 2 * 900 + 1)
    welcome = _sign_in(staff.email, PASSWORD)
    assert welcome.status_code == 302 and welcome.signed_in


def test_it_locks_a_client_that_guesses_across_usernames(staff: User, settings: Any) -> None:
    settings.STAFF_LOGIN_MAX_FAILURES = 3
    for number in range(3):
        assert not _sign_in(f"guess{number}@mailplatform.test", WRONG, ip="2001:db8:aa:1::7").signed_in
    # The same /64, another address, the right password: still that client.
    locked = _sign_in(staff.email, PASSWORD, ip="2001:db8:aa:1::8")
    assert not locked.signed_in and LOCKED in locked.content.decode()
    assert _sign_in(staff.email, PASSWORD, ip="2001:db8:bb:1::8").signed_in


def test_it_audits_staff_sign_ins_good_and_bad_with_the_ip_and_never_the_password(staff: User) -> None:
    member = User.objects.create_user(email="member@mailplatform.test", password=PASSWORD)
    assert not _sign_in(staff.email, WRONG, ip="198.51.100.4").signed_in
    assert not _sign_in(member.email, PASSWORD, ip="198.51.100.5").signed_in  # no staff rights
    assert _sign_in(staff.email, PASSWORD, ip="198.51.100.6").signed_in

    failures = AuditEntry.objects.filter(action="auth.staff_login_failed").order_by("created_at")
    assert [(entry.ip, entry.actor_label, entry.after["reason"]) for entry in failures] == [
        ("198.51.100.4", staff.email, "invalid_login"),
        ("198.51.100.5", member.email, "not_staff"),
    ]
    assert all(entry.actor_user_id is None for entry in failures)  # a claim, not a proven identity
    success = AuditEntry.objects.get(action="auth.staff_login")
    assert (success.ip, success.actor_type, success.actor_user_id) == ("198.51.100.6", "staff", staff.pk)

    stored = json.dumps(json.loads(serializers.serialize("json", AuditEntry.objects.all())))
    assert PASSWORD not in stored and WRONG not in stored


def test_it_keeps_a_session_opened_by_a_tenants_sso_out_of_the_admin(staff: User, world: Any) -> None:
    from tenants.access import session_scope_limit

    client = Client()
    client.force_login(staff)
    assert client.get("/admin/").status_code == 200  # the same staff user, signed in by the admin
    session = client.session
    session_scope_limit(session, world.tenant.pk)  # what a sign-in through tenant A's SSO leaves
    session.save()
    answer = client.get("/admin/")
    assert answer.status_code == 302 and answer["Location"].startswith("/admin/login/")
