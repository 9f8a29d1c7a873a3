"""The code proxy: an account's newest verification code, through its link or its account_ref.

``GET /api/v1/links/{link}/codes/latest/?wait=&since=`` and
``GET /api/v1/accounts/{account_ref}/codes/latest/?provider=&wait=&since=``: the same
long-poll as ``/mailboxes/{id}/codes/latest/`` (mailboxes.api.waiting: the waiters' pool,
the NOTIFY wake-ups, shared reads), asked of one binding: only mail of the account's active
mailbox received after the binding was made (or after ``since``), and in a shared mailbox
only what its provider's rules attribute to it. Permission ``codes:read``; rate-limited per
key and per account.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.utils.dateparse import parse_datetime

from audit import context
from mailboxes import waiting
from mailboxes.api.waiting import ApiError, WaitingView, _answer_body, _authenticate, _timeout, parameter_invalid
from mailboxes.bindings import selectors
from mailboxes.models import AccountBinding
from tenants.access import Permission

RATE_WINDOW = 60  # seconds


class RateLimited(ApiError):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(429, "rate_limited", message)
        self.retry_after = retry_after

    def response(self) -> JsonResponse:
        response = super().response()
        response["Retry-After"] = str(self.retry_after)
        return response


@dataclass(frozen=True)
class _Start:
    binding: AccountBinding
    question: selectors.CodeQuestion


def _rate_limit(scope: str, subject: str, limit: int) -> None:
    from mailplatform import ratelimit

    if not ratelimit.hit(scope, subject, limit=limit, window=RATE_WINDOW):
        wait = ratelimit.seconds_left(RATE_WINDOW, scope, subject, limit=limit)
        raise RateLimited(f"Too many code requests; at most {limit} a minute. Retry in {wait} s.", wait)


def _since(value: str) -> datetime:
    """``since=``: an ISO 8601 time, in UTC before it reaches the database (whose offsets stop
    at 15:59, where ISO 8601's go on)."""
    try:
        parsed = parse_datetime(value.replace(" ", "+"))
        if parsed is None:
            raise ValueError(value)
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        raise parameter_invalid("since", "expected an ISO 8601 time.") from None


def _start(request: HttpRequest, *, link: str | None, account_ref: str | None, provider: str | None) -> _Start:
    """Authenticate, find the binding through the key's scope, count the request: one pool job."""
    principal = _authenticate(request, Permission.CODES_READ)
    if link is not None:
        binding = selectors.binding_by_link(principal, link)
    else:
        binding = selectors.binding_for_account(principal, account_ref or "", provider)
    if binding is None:
        raise ApiError(404, "not_found", "Not found.")
    assert principal.api_key is not None
    _rate_limit("binding-codes-key", str(principal.api_key.pk), int(getattr(settings, "BINDING_CODES_PER_KEY", 600)))
    _rate_limit(
        "binding-codes-account",
        f"{binding.tenant_id}:{binding.account_ref}",
        int(getattr(settings, "BINDING_CODES_PER_ACCOUNT", 60)),
    )
    after: datetime = binding.created_at
    since = request.GET.get("since")
    if since:
        after = max(after, _since(since))
    try:
        question = selectors.code_question_for(binding, after)
    except selectors.ProviderNotConfigured:
        raise ApiError(
            409,
            "provider_not_configured",
            f"The mailbox is shared and provider {binding.provider!r} has no sender domains or subject "
            "patterns: set them (/api/v1/providers/) so its mail can be told apart.",
        ) from None
    return _Start(binding=binding, question=question)


def _question(code_question: selectors.CodeQuestion) -> waiting.Question:
    looked = False

    def find() -> waiting.Candidate | None:
        nonlocal looked
        # After the first full look, a re-check skips the query while the mailbox has had no
        # mail indexed lately (selectors.mailboxes_indexed_recently).
        if looked and code_question.mailbox_id not in selectors.mailboxes_indexed_recently(code_question.tenant_id):
            return None
        row = selectors.binding_code_newest(code_question)
        looked = True
        return waiting.Candidate(*row) if row else None

    def check(message_id: Any) -> waiting.Candidate | None:
        row = selectors.binding_code_newest(code_question, message_id)
        return waiting.Candidate(*row) if row else None

    return waiting.Question(
        key=("binding", code_question),  # waiters of one binding with the same start share reads
        tenant_id=code_question.tenant_id,
        mailbox_id=code_question.mailbox_id,
        after=code_question.after,
        find=find,
        check=check,
    )


class BindingCodeView(WaitingView):
    required_permissions = {"get": Permission.CODES_READ}

    async def answer(self, request: HttpRequest, **kwargs: Any) -> JsonResponse:
        wait = _timeout(request.GET.get("wait"), 0.0, name="wait")
        start = await waiting.db(
            _start,
            request,
            link=kwargs.get("link"),
            account_ref=kwargs.get("account_ref"),
            provider=request.GET.get("provider") or None,
        )
        binding = start.binding
        context.set_tenant(str(binding.tenant_id))
        found = await waiting.wait_for(_question(start.question), timeout=wait)
        if found is None:
            if wait:
                raise ApiError(408, "timeout", f"No code arrived within {wait:g} seconds.")
            raise ApiError(404, "no_code", "No code for this account since it was bound.")
        body = dict(await _answer_body("code", found))
        body.update({"binding": str(binding.pk), "account_ref": binding.account_ref, "provider": binding.provider})
        await waiting.db(selectors.codes_served_count, binding.pool_id)
        return JsonResponse(body)


class LinkCodeLatestView(BindingCodeView):
    """``GET /api/v1/links/{link}/codes/latest/?wait=&since=``.

    The newest verification code (and links) the account's mailbox received since the binding
    was made (or since ``since``), attributed to the account's provider when the mailbox is
    shared. With ``wait`` (seconds, at most 300) waits for one (408 when none comes); without
    it answers 404 ``no_code`` at once. A released or unknown link answers 404 ``not_found``.
    """


class AccountCodeLatestView(BindingCodeView):
    """``GET /api/v1/accounts/{account_ref}/codes/latest/?provider=&wait=&since=``.

    The same as the link's, found by your account id (and, if given, its provider).
    """
