"""Long-polling endpoints, served asynchronously (ASGI): wait for a message, or for a code.

These are plain async Django views, not DRF (whose views are synchronous): they
authenticate with the same API keys (``tenants.services.api_key_authenticate``), check the
same rules (tenant active, IP allowlist, ``messages:read``), scope every query through the
principal, and answer the API's error shape. A waiter costs a coroutine and an asyncio
event, not a thread or a connection: its database work runs in the small pool of
:mod:`mailboxes.waiting` (one job to authenticate and check, then shared reads), and it is
woken by a notification when a message of its mailbox (or tenant) is indexed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from audit import context
from audit.middleware import client_ip
from mailboxes import selectors, waiting
from mailboxes.api.message_serializers import MessageDetailSerializer
from mailboxes.models import Message
from mailboxes.search import QuerySyntaxError, query_parse
from mailplatform.api import error_body
from mailplatform.unavailable import DATABASE_UNAVAILABLE, database_unavailable_response, is_database_unavailable
from tenants.access import IpNotAllowed, Permission, Principal, TenantSuspended, principal_ensure_usable
from tenants.services import KeyRejected, api_key_authenticate

MAX_TIMEOUT = 300.0
DEFAULT_TIMEOUT = 30.0


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details

    def response(self) -> JsonResponse:
        response = JsonResponse(error_body(self.code, self.message, self.details), status=self.status)
        if self.status == 401:
            response["WWW-Authenticate"] = 'Bearer realm="mailplatform"'
        return response


def _authenticate(request: HttpRequest, permission: Permission = Permission.MESSAGES_READ) -> Principal:
    """The same rules as tenants.api.authentication.ApiKeyAuthentication + KeyPermission."""
    parts = request.headers.get("Authorization", "").split()
    if not parts:
        raise ApiError(401, "not_authenticated", "Send an API key as 'Authorization: Bearer mp_...'.")
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise ApiError(401, "invalid_authorization_header", "Send the key as 'Authorization: Bearer mp_...'.")
    ip = client_ip(request)
    try:
        api_key = api_key_authenticate(secret=parts[1], ip=ip)
    except KeyRejected as rejected:
        raise ApiError(401, rejected.code, str(rejected)) from None
    context.set_tenant(str(api_key.tenant_id))
    principal = Principal.for_api_key(api_key)
    try:
        principal_ensure_usable(principal, ip)
    except (TenantSuspended, IpNotAllowed) as refusal:
        raise ApiError(403, refusal.code, str(refusal)) from None
    if not principal.has_perm(permission):
        raise ApiError(403, "missing_permission", f"This API key lacks the {permission} permission.")
    return principal


def parameter_invalid(name: str, problem: str) -> ApiError:
    """400 ``validation_error`` for the query parameter ``name``, named in ``details`` too."""
    return ApiError(400, "validation_error", f"{name}: {problem}", details={name: [problem]})


def _timeout(value: str | None, default: float, *, name: str) -> float:
    """Seconds to wait, from the query parameter ``name`` (``timeout`` or ``wait``)."""
    if value in (None, ""):
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise parameter_invalid(name, "a number of seconds.") from None
    if not 0 <= seconds <= MAX_TIMEOUT or seconds != seconds:
        raise parameter_invalid(name, f"between 0 and {MAX_TIMEOUT:.0f} seconds.")
    return seconds


def _uuid(value: str | None, name: str) -> UUID | None:
    if not value:
        return None
    try:
        return UUID(value)
    except ValueError:
        raise parameter_invalid(name, "must be an id.") from None


@dataclass(frozen=True)
class _Start:
    principal: Principal
    after: datetime | None


def _start(request: HttpRequest, *, mailbox_id: UUID | None, after: str | None) -> _Start:
    """Everything a waiter needs from the database before it waits, in one pool job."""
    principal = _authenticate(request)
    if mailbox_id is not None and not selectors.mailbox_list(principal).filter(pk=mailbox_id).exists():
        raise ApiError(404, "not_found", "Not found.")
    resolved = None
    if after:
        try:
            resolved = selectors.message_after_resolve(principal, after)
        except ValueError:
            raise parameter_invalid("after", "expected an ISO 8601 time or a message id.") from None
    return _Start(principal=principal, after=resolved)


def _question(
    principal: Principal, *, mailbox_id: UUID | None, after: datetime | None, query: str = "", with_code: bool = False
) -> waiting.Question:
    def find() -> waiting.Candidate | None:
        row = selectors.message_ready_newest(principal, mailbox_id=mailbox_id, query=query, with_code=with_code)
        return waiting.Candidate(*row) if row else None

    def check(message_id: UUID) -> waiting.Candidate | None:
        row = selectors.message_ready_newest(
            principal, mailbox_id=mailbox_id, query=query, with_code=with_code, message_id=message_id
        )
        return waiting.Candidate(*row) if row else None

    # Waiters with the same scope and question share their reads (mailboxes.waiting.shared).
    scope = (principal.tenant_id, principal.granted_domain_ids, principal.granted_mailbox_ids)
    return waiting.Question(
        key=(scope, mailbox_id, query, with_code),
        tenant_id=principal.tenant_id,
        mailbox_id=mailbox_id,
        after=after,
        find=find,
        check=check,
    )


def _detail(message_id: UUID) -> dict[str, Any] | None:
    # The waiter's principal already saw this message; the body is the same for everyone.
    message = Message.objects.filter(pk=message_id, deleted_at__isnull=True).prefetch_related("attachments").first()
    return dict(MessageDetailSerializer(message).data) if message is not None else None


def _code_body(message_id: UUID) -> dict[str, Any] | None:
    message = Message.objects.filter(pk=message_id, deleted_at__isnull=True).first()
    if message is None or not message.codes:
        return None
    return {
        "code": message.codes[0],
        "codes": message.codes,
        "message": str(message.pk),
        "mailbox": str(message.mailbox_id),
        "subject": message.subject,
        "from": message.from_address,
        "received_at": message.received_at.isoformat(),
        "links": message.links,
    }


async def _answer_body(kind: str, message_id: UUID) -> dict[str, Any]:
    build = _detail if kind == "detail" else _code_body
    body = await waiting.shared((kind, message_id), lambda: waiting.db(build, message_id), ttl=waiting.ANSWER_TTL)
    if body is None:
        raise ApiError(404, "not_found", "The message was deleted before it could be sent.")
    return body


# Keys come in the Authorization header, never in cookies: CSRF does not apply (and must not
# turn another method into an HTML 403 instead of the 405 below).
@method_decorator(csrf_exempt, name="dispatch")
class WaitingView(View):
    """Shared plumbing: authenticate, parse, wait, answer JSON (408 on timeout)."""

    required_permissions = {"get": Permission.MESSAGES_READ}
    http_method_names = ["get", "options"]

    def http_method_not_allowed(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        """405 in the API's error shape (Django's own has an empty body), with Allow (RFC 9110 15.5.6)."""
        response = ApiError(405, "method_not_allowed", f'Method "{request.method}" not allowed.').response()
        response["Allow"] = ", ".join(name.upper() for name in self.http_method_names if hasattr(self, name))

        async def answer() -> HttpResponse:  # an async view's handlers are coroutines
            return response

        return answer()

    async def get(self, request: HttpRequest, **kwargs: Any) -> HttpResponse:
        correlation = context.new_correlation_id()
        response: HttpResponse
        with context.bind(correlation_id=correlation, ip=client_ip(request)):
            try:
                response = await self.answer(request, **kwargs)
            except ApiError as error:
                response = error.response()
            except DATABASE_UNAVAILABLE as error:  # no middleware here to answer it
                if not is_database_unavailable(error):
                    raise  # an error of ours: a 500, logged with its traceback
                response = database_unavailable_response(request, error)
        response["X-Request-ID"] = correlation
        response["Cache-Control"] = "no-store"
        response["Content-Length"] = str(len(response.content))  # no middleware here sets it
        if response.status_code == 408:
            # Nothing arrived in time: the ordinary end of a wait, not a client error for
            # django.request to log (a test loop waits all day).
            response._has_been_logged = True  # type: ignore[attr-defined]
        return response

    # Each waiting endpoint answers with its own coroutine: async def answer(self, request, **kwargs).
    answer: Callable[..., Awaitable[JsonResponse]]


class MessageWaitView(WaitingView):
    """``GET /api/v1/messages/wait/?mailbox=&after=&q=&timeout=``.

    Answers the newest indexed message the key can see that matches (received after
    ``after``, an ISO 8601 time or a message id), as soon as there is one; 408 after
    ``timeout`` seconds (default 30, at most 300) without one.
    """

    async def answer(self, request: HttpRequest, **kwargs: Any) -> JsonResponse:
        params = request.GET
        timeout = _timeout(params.get("timeout"), DEFAULT_TIMEOUT, name="timeout")
        mailbox_id = _uuid(params.get("mailbox"), "mailbox")
        query = params.get("q", "")
        try:
            query_parse(query)
        except QuerySyntaxError as error:
            raise ApiError(400, "invalid_query", f"q: {error}") from None
        start = await waiting.db(_start, request, mailbox_id=mailbox_id, after=params.get("after"))
        context.set_tenant(str(start.principal.tenant_id))
        question = _question(start.principal, mailbox_id=mailbox_id, after=start.after, query=query)
        found = await waiting.wait_for(question, timeout=timeout)
        if found is None:
            raise ApiError(408, "timeout", f"No matching message arrived within {timeout:g} seconds.")
        return JsonResponse(await _answer_body("detail", found))


class CodeLatestView(WaitingView):
    """``GET /api/v1/mailboxes/{id}/codes/latest/?wait=&after=``.

    The newest verification code in the mailbox. With ``wait`` (seconds, at most 300), waits
    for a message with a code when there is none yet (408 when none comes); without it,
    answers 404 ``no_code`` at once. Pass ``after`` (a time or message id) to ignore codes
    of earlier mail.
    """

    async def answer(self, request: HttpRequest, **kwargs: Any) -> JsonResponse:
        mailbox_id = _uuid(str(kwargs["pk"]), "mailbox")
        wait = _timeout(request.GET.get("wait"), 0.0, name="wait")
        start = await waiting.db(_start, request, mailbox_id=mailbox_id, after=request.GET.get("after"))
        context.set_tenant(str(start.principal.tenant_id))
        question = _question(start.principal, mailbox_id=mailbox_id, after=start.after, with_code=True)
        found = await waiting.wait_for(question, timeout=wait)
        if found is None:
            if wait:
                raise ApiError(408, "timeout", f"No code arrived within {wait:g} seconds.")
            raise ApiError(404, "no_code", "No message with a code in this mailbox yet.")
        return JsonResponse(await _answer_body("code", found))
