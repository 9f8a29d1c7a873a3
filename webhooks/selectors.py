"""Reads of webhooks, always through the caller's scope.

Endpoints are tenant-wide: a key limited to some domains or mailboxes sees none.
"""

from __future__ import annotations

from uuid import UUID

from django.db.models import QuerySet

from audit.models import Event
from tenants.access import Permission, Principal
from webhooks.models import Delivery, Endpoint


def endpoint_list(principal: Principal) -> QuerySet[Endpoint]:
    return principal.scope(Endpoint.objects.all())


def endpoint_get(principal: Principal, endpoint_id: UUID | str) -> Endpoint:
    return endpoint_list(principal).get(pk=endpoint_id)


def delivery_list(principal: Principal, endpoint: Endpoint, *, state: str | None = None) -> QuerySet[Delivery]:
    """An endpoint's deliveries, newest first; ``state="dead"`` is the dead-letter view."""
    queryset = principal.scope(Delivery.objects.filter(endpoint=endpoint)).select_related("event")
    if state:
        queryset = queryset.filter(state=state)
    return queryset


def delivery_get(principal: Principal, endpoint: Endpoint, delivery_id: UUID | str) -> Delivery:
    return delivery_list(principal, endpoint).get(pk=delivery_id)


def deliveries_of_event(principal: Principal, event: Event) -> QuerySet[Delivery]:
    """The deliveries of one event (only for principals that manage webhooks)."""
    if not principal.has_perm(Permission.WEBHOOKS_MANAGE):
        return Delivery.objects.none()
    return principal.scope(Delivery.objects.filter(event=event)).order_by("created_at")


def event_deliveries_extra(principal: Principal, event: Event) -> dict[str, object]:
    """``deliveries`` for the event detail API, for principals that manage webhooks."""
    if not principal.has_perm(Permission.WEBHOOKS_MANAGE):
        return {}
    from webhooks.api.serializers import DeliverySerializer

    rows = deliveries_of_event(principal, event).select_related("event")
    return {"deliveries": DeliverySerializer(rows, many=True).data}
