"""Periodic domain checks. Thin: the rules live in tenants.services."""

from __future__ import annotations

from celery import shared_task

from tenants import services
from tenants.models import Domain


@shared_task(name="tenants.tasks.domains_check_due", ignore_result=True)
def domains_check_due() -> int:
    """Enqueue a check for every domain not checked within DOMAIN_CHECK_INTERVAL."""
    due = services.domains_due_for_check()
    for domain_id in due:
        domain_check.delay(str(domain_id))
    return len(due)


@shared_task(name="tenants.tasks.domain_check", ignore_result=True, acks_late=True, soft_time_limit=60, time_limit=90)
def domain_check(domain_id: str) -> str | None:
    domain = Domain.objects.filter(pk=domain_id).first()
    if domain is None:
        return None
    return services.domain_check(domain=domain).state
