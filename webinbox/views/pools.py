"""The console's "Mailbox pools" page: pools with live metrics, a pool's mailboxes with their
bindings, an account search, reassign and release, and the providers' attribution rules.

Same rules as the rest of the console (webinbox.views.console.console_view): the member's
principal, reads through the pool selectors, writes through the pool services (which check
``bindings:manage`` and write the audit entry).
"""

from __future__ import annotations

from collections.abc import Callable

from django.contrib import messages as flash
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from mailboxes.bindings import selectors, services
from mailboxes.models import AccountBinding
from tenants.access import Permission, Principal
from webinbox.views.console import _errors, _page, _uuid, console_view

MAX_ROWS = 200


def _require(principal: Principal) -> None:
    if not principal.has_perm(Permission.BINDINGS_MANAGE):
        raise PermissionDenied("Mailbox pools need the bindings:manage permission (owners and admins).")


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.replace(",", "\n").splitlines() if line.strip()]


def _binding_action(request: HttpRequest, principal: Principal) -> None:
    """release / reassign a binding named in the form (looked up through the scope)."""
    binding = selectors.binding_scope(principal).get(pk=_uuid(request.POST.get("binding", "")), active=True)
    if request.POST.get("action") == "release":
        services.binding_release(principal=principal, binding=binding)
        flash.success(request, f"{binding.account_ref} released.")
        return
    target = request.POST.get("mailbox", "").strip()
    mailbox = selectors.mailbox_in_pool(principal, _uuid(target)) if target else None
    if target and mailbox is None:
        raise ValidationError("Not a mailbox of one of your pools.")
    moved = services.binding_reassign(principal=principal, binding=binding, mailbox=mailbox)
    flash.success(request, f"{moved.account_ref} now receives at {moved.mailbox.address}.")


def _attempt(request: HttpRequest, action: Callable[[], None]) -> None:
    """Run a console write; what the services refuse becomes a message on the next page."""
    try:
        action()
    except ValidationError as exc:
        _errors(request, exc)
    except services.BindingConflict as conflict:
        flash.error(request, conflict.message)
    except AccountBinding.DoesNotExist:
        flash.error(request, "That binding is not active any more.")


def _pools_action(request: HttpRequest, principal: Principal) -> None:
    action = request.POST.get("action")
    if action == "provider_save":
        services.provider_save(
            principal=principal,
            name=request.POST.get("name", ""),
            sender_domains=_lines(request.POST.get("sender_domains", "")),
            subject_patterns=[
                line.strip() for line in request.POST.get("subject_patterns", "").splitlines() if line.strip()
            ],
        )
        flash.success(request, "Provider saved.")
    elif action == "provider_delete":
        provider = selectors.provider_list(principal).get(pk=_uuid(request.POST.get("provider", "")))
        services.provider_delete(principal=principal, provider=provider)
        flash.success(request, f"Provider {provider.name} removed.")
    elif action in {"release", "reassign"}:
        _binding_action(request, principal)


@console_view
@require_http_methods(["GET", "POST"])
def pools(request: HttpRequest, principal: Principal) -> HttpResponse:
    _require(principal)
    if request.method == "POST":
        _attempt(request, lambda: _pools_action(request, principal))
        return redirect(request.get_full_path())
    account = request.GET.get("account", "").strip()
    rows = [(pool, selectors.pool_metrics(pool)) for pool in selectors.pool_list(principal)[:MAX_ROWS]]
    found = (
        list(selectors.binding_list(principal, account_ref=account).order_by("-created_at")[:MAX_ROWS])
        if account
        else []
    )
    context = {"rows": rows, "account": account, "found": found, "providers": selectors.provider_list(principal)}
    if request.GET.get("partial"):
        return render(request, "webinbox/console/_pool_metrics.html", context)
    return _page(request, principal, "pools.html", "pools", **context)


@console_view
@require_http_methods(["GET", "POST"])
def pool_detail(request: HttpRequest, principal: Principal, pool_id: str) -> HttpResponse:
    _require(principal)
    pool = selectors.pool_get(principal, _uuid(pool_id))
    if request.method == "POST":
        _attempt(request, lambda: _binding_action(request, principal))
        return redirect(request.path)
    members = list(selectors.pool_mailboxes(pool)[:MAX_ROWS])
    active = selectors.binding_list(principal, pool_id=pool.pk, active=True).filter(
        mailbox_id__in=[member.mailbox_id for member in members]
    )
    by_mailbox: dict[object, list[AccountBinding]] = {}
    for binding in active:
        by_mailbox.setdefault(binding.mailbox_id, []).append(binding)
    mailboxes = [(member, by_mailbox.get(member.mailbox_id, [])) for member in members]
    return _page(
        request,
        principal,
        "pool.html",
        "pools",
        pool=pool,
        metrics=selectors.pool_metrics(pool),
        mailboxes=mailboxes,
        more=pool.members.count() > len(members),
    )
