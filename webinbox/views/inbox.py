"""The signed-in inbox: every mailbox a member can see, live message lists, the message view."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.contrib.auth.decorators import login_required
from django.core.exceptions import ObjectDoesNotExist, PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from mailboxes.selectors import mailbox_get, mailbox_list, message_get
from tenants.access import Permission, Principal, TenantSuspended, principal_ensure_usable, session_memberships
from tenants.selectors import memberships_of
from webinbox import services
from webinbox.forms import TagsForm
from webinbox.views import common
from webinbox.views.public import _message_action


def _member_principals(request: HttpRequest) -> list[Principal]:
    """The member's principal in each tenant this session may use (one, after a tenant's SSO)."""
    memberships = session_memberships(request.session, memberships_of(request.user))  # type: ignore[arg-type]
    return [Principal.for_member(membership) for membership in memberships]


def _principals(request: HttpRequest) -> tuple[list[Principal], list[str]]:
    """The principals usable from here, and a line for each tenant that refuses this request."""
    usable, refused = [], []
    for principal in _member_principals(request):
        try:
            principal_ensure_usable(principal, services.client_ip())
        except TenantSuspended:
            refused.append(f"{principal.tenant.name} is suspended.")
        except PermissionDenied as refusal:
            reason = str(refusal)
            refused.append(f"{principal.tenant.name}: {reason[:1].lower()}{reason[1:]}")
        else:
            usable.append(principal)
    return usable, refused


def _principal_for(request: HttpRequest, tenant_slug: str) -> Principal:
    """Another tenant's slug answers 404; a tenant that refuses this request, 403 saying why."""
    for principal in _member_principals(request):
        if principal.tenant.slug == tenant_slug:
            principal_ensure_usable(principal, services.client_ip())
            return principal
    raise Http404


def _uuid(value: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise Http404 from None


@login_required
@require_GET
def inbox(request: HttpRequest) -> HttpResponse:
    """Every tenant's mailboxes; the first tenant's messages across its mailboxes."""
    principals, refused = _principals(request)
    tenants = [{"principal": principal, "mailboxes": list(mailbox_list(principal)[:200])} for principal in principals]
    context: dict[str, Any] = {"tenants": tenants, "refused": refused}
    if principals:
        principal = principals[0]
        context.update(
            {
                "current_tenant": principal.tenant,
                "poll_url": reverse("webinbox:tenant-poll", kwargs={"tenant_slug": principal.tenant.slug}),
                "message_base": f"/inbox/{principal.tenant.slug}/m/",
                **common.list_context(principal, request, mailbox_id=None),
            }
        )
    return common.render_list(request, "webinbox/inbox.html", context)


@login_required
@require_GET
def tenant_inbox(request: HttpRequest, tenant_slug: str, mailbox_id: str | None = None) -> HttpResponse:
    principal = _principal_for(request, tenant_slug)
    mailbox = None
    if mailbox_id is not None:
        try:
            mailbox = mailbox_get(principal, _uuid(mailbox_id))
        except ObjectDoesNotExist:
            raise Http404 from None
    usable, refused = _principals(request)
    tenants = [{"principal": p, "mailboxes": list(mailbox_list(p)[:200])} for p in usable]
    poll_kwargs = {"tenant_slug": tenant_slug, **({"mailbox_id": mailbox.pk} if mailbox else {})}
    context = {
        "tenants": tenants,
        "refused": refused,
        "current_tenant": principal.tenant,
        "mailbox": mailbox,
        "poll_url": reverse("webinbox:mailbox-poll" if mailbox else "webinbox:tenant-poll", kwargs=poll_kwargs),
        "message_base": f"/inbox/{tenant_slug}/m/",
        **common.list_context(principal, request, mailbox_id=mailbox.pk if mailbox else None),
    }
    return common.render_list(request, "webinbox/inbox.html", context)


@login_required
@require_GET
def poll(request: HttpRequest, tenant_slug: str, mailbox_id: str | None = None) -> HttpResponse:
    principal = _principal_for(request, tenant_slug)
    mailbox_uuid = _uuid(mailbox_id) if mailbox_id else None
    if mailbox_uuid is not None:
        try:
            mailbox_get(principal, mailbox_uuid)
        except ObjectDoesNotExist:
            raise Http404 from None
    return common.poll_response(principal, request, mailbox_id=mailbox_uuid)


def _message(request: HttpRequest, tenant_slug: str, message_id: str) -> tuple[Principal, Any]:
    principal = _principal_for(request, tenant_slug)
    try:
        return principal, message_get(principal, _uuid(message_id))
    except ObjectDoesNotExist:
        raise Http404 from None


@login_required
@require_http_methods(["GET", "POST"])
def message(request: HttpRequest, tenant_slug: str, message_id: str) -> HttpResponse:
    principal, found = _message(request, tenant_slug, message_id)
    back = reverse("webinbox:mailbox", kwargs={"tenant_slug": tenant_slug, "mailbox_id": found.mailbox_id})
    can_write = principal.has_perm(Permission.MESSAGES_WRITE)
    if request.method == "POST":
        if not can_write:
            raise PermissionDenied
        return _message_action(request, principal, found, back=back, here=request.path)
    if can_write and not found.is_read:
        from mailboxes.services import message_update

        message_update(principal=principal, message=found, is_read=True)
    context = {
        "back_url": back,
        "current_tenant": principal.tenant,
        "can_write": can_write,
        "can_reply": principal.has_perm(Permission.MESSAGES_SEND) and found.mailbox is not None,
        "reply_url": request.path + "reply/",
        "tags_form": TagsForm(initial={"tags": ", ".join(found.tags)}),
        **common.message_context(found, request, body_url=request.path + "body/"),
    }
    return render(request, "webinbox/message.html", context)


@login_required
@require_GET
def message_body(request: HttpRequest, tenant_slug: str, message_id: str) -> HttpResponse:
    _, found = _message(request, tenant_slug, message_id)
    return common.message_body(request, found)


@login_required
@require_POST
def message_reply(request: HttpRequest, tenant_slug: str, message_id: str) -> HttpResponse:
    """The reply box: answer from the mailbox's own address, threaded under the message
    (outbound.services.message_send sets In-Reply-To and References)."""
    from django.contrib import messages as flash
    from django.core.exceptions import ValidationError
    from django.shortcuts import redirect

    from mailboxes.replies import subject_is_reply
    from outbound import services as outbound

    principal, found = _message(request, tenant_slug, message_id)
    if not principal.has_perm(Permission.MESSAGES_SEND) or found.mailbox is None:
        raise PermissionDenied
    text = request.POST.get("text", "")[:100_000]
    if not text.strip():
        flash.error(request, "Write something to send.")
        return redirect(request.path.removesuffix("reply/"))
    answer_to = [entry["address"] for entry in found.reply_to if entry.get("address")] or [found.from_address]
    subject = found.subject if subject_is_reply(found.subject) else f"Re: {found.subject}"
    composition = outbound.Composition(
        from_address=found.mailbox.address,
        to=[address for address in answer_to if address],
        subject=subject[:998],
        text=text,
        reply_to_message=found,
    )
    try:
        outbound.message_send(principal=principal, composition=composition)
    except outbound.SendRefused as refusal:
        flash.error(request, f"Not sent: {refusal}")
    except (ValidationError, PermissionDenied) as exc:
        flash.error(request, f"Not sent: {' '.join(getattr(exc, 'messages', [str(exc)]))}")
    else:
        flash.success(request, f"Reply queued to {', '.join(composition.to)}.")
    return redirect(request.path.removesuffix("reply/"))
