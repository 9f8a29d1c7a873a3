"""The Django admin's password sign-in: throttled, and every attempt in the audit trail.

Staff are the only accounts with passwords, and they reach every tenant, so guessing is
worth a lot: after STAFF_LOGIN_MAX_FAILURES failed attempts for one username, or from one
client IP (an IPv6 client by its /64), within STAFF_LOGIN_WINDOW seconds, every attempt is
refused until the window ends, even with the right password (else the lock would tell a
guesser when a guess is right). Counters live in the rate-limit cache (mailplatform.ratelimit).

Audit: ``auth.staff_login`` for a success, ``auth.staff_login_failed`` for a failure (the
reason, and the username as typed, as an unproven claim), both with the client IP. The
password never leaves the form.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.core.exceptions import ValidationError

from audit import context
from audit.models import AuditEntry
from audit.services import Actor, audit_entry_record
from mailplatform import ratelimit
from mailplatform.clientip import rate_limit_subject

SCOPE_USERNAME = "staff-login-user"
SCOPE_IP = "staff-login-ip"


def _username_key(username: str) -> str:
    return username.strip().lower()


def staff_login_locked(*, username: str, ip: str | None) -> bool:
    """Has this username, or this client, used up its failures for the current window?"""
    window, limit = settings.STAFF_LOGIN_WINDOW, settings.STAFF_LOGIN_MAX_FAILURES
    subject_ip = rate_limit_subject(ip)
    return (
        ratelimit.used(SCOPE_USERNAME, _username_key(username), window=window) >= limit
        or ratelimit.used(SCOPE_IP, subject_ip, window=window) >= limit
    )


def staff_login_failure_record(*, username: str, ip: str | None, reason: str) -> None:
    """Count a failed attempt against the username and the client, and audit it."""
    window, limit = settings.STAFF_LOGIN_WINDOW, settings.STAFF_LOGIN_MAX_FAILURES
    if reason != "throttled":  # refusals while locked do not push the end of the lock out
        ratelimit.hit(SCOPE_USERNAME, _username_key(username), limit=limit, window=window)
        ratelimit.hit_ip(SCOPE_IP, ip, limit=limit, window=window)
    audit_entry_record(
        tenant_id=None,
        # Nobody proved who they are: the label is what was typed, a claim (never the password).
        actor=Actor(type=AuditEntry.ActorType.USER, label=username[:254]),
        action="auth.staff_login_failed",
        resource_type="user",
        after={"reason": reason, "via": "admin"},
    )


def staff_login_record(*, user: Any) -> None:
    """Audit a successful admin sign-in."""
    audit_entry_record(
        tenant_id=None,
        actor=Actor(type=AuditEntry.ActorType.STAFF, label=str(user.email), user_id=user.pk),
        action="auth.staff_login",
        resource_type="user",
        resource_id=user.pk,
        after={"via": "admin"},
    )


class StaffAuthenticationForm(AdminAuthenticationForm):
    """The admin's sign-in form, throttled and audited (the site's ``login_form``)."""

    error_messages = {
        **AdminAuthenticationForm.error_messages,
        "throttled": "Too many failed sign-in attempts. Try again in %(minutes)s minutes.",
    }

    def clean(self) -> dict[str, Any]:
        username = str(self.cleaned_data.get("username") or "")
        if not username or not self.cleaned_data.get("password"):
            return super().clean()  # a missing field: the form's own "required" errors
        ip = context.current().ip
        if staff_login_locked(username=username, ip=ip):
            staff_login_failure_record(username=username, ip=ip, reason="throttled")
            window, limit = settings.STAFF_LOGIN_WINDOW, settings.STAFF_LOGIN_MAX_FAILURES
            seconds = max(
                ratelimit.seconds_left(window, SCOPE_USERNAME, _username_key(username), limit=limit),
                ratelimit.seconds_left_ip(window, SCOPE_IP, ip, limit=limit),
            )
            minutes = max(1, -(-seconds // 60))
            raise ValidationError(self.error_messages["throttled"], code="throttled", params={"minutes": minutes})
        try:
            cleaned = super().clean()
        except ValidationError as error:
            if error.code == "inactive":
                reason = "inactive"
            elif self.user_cache is not None:  # the right password of an account without staff rights
                reason = "not_staff"
            else:
                reason = "invalid_login"
            staff_login_failure_record(username=username, ip=ip, reason=reason)
            raise
        staff_login_record(user=self.get_user())
        return cleaned
