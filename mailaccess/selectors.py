"""Reads of mail-access credentials, through the principal's scope."""

from __future__ import annotations

from django.db.models import QuerySet

from mailaccess.models import AppPassword
from tenants.access import Principal


def app_password_list(principal: Principal) -> QuerySet[AppPassword]:
    """The app passwords of the mailboxes the principal sees, newest first."""
    return principal.scope(AppPassword.objects.select_related("mailbox"), mailbox_field="mailbox").order_by(
        "-created_at"
    )
