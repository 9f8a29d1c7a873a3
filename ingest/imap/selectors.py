"""Reads of IMAP pull connectors, always through the caller's scope.

Connectors are scoped like their target mailbox: a key limited to some domains or mailboxes
sees the connectors that pull into those.
"""

from __future__ import annotations

from uuid import UUID

from django.db.models import QuerySet

from ingest.models import Connector, ConnectorFolder
from tenants.access import Principal


def connector_list(principal: Principal) -> QuerySet[Connector]:
    return principal.scope(
        Connector.objects.select_related("mailbox"), domain_field="mailbox__domain", mailbox_field="mailbox"
    )


def connector_get(principal: Principal, connector_id: UUID | str) -> Connector:
    """The connector, or Connector.DoesNotExist when it is missing or outside the scope."""
    return connector_list(principal).get(pk=connector_id)


def connector_folders(principal: Principal, connector: Connector) -> QuerySet[ConnectorFolder]:
    """The folder cursors of a connector the principal can see."""
    return ConnectorFolder.objects.filter(connector__in=connector_list(principal).filter(pk=connector.pk)).order_by(
        "name"
    )
