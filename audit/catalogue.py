"""The event catalogue: every type the platform records in a tenant's event log.

The one list: a webhook endpoint's filter accepts these types and prefixes of them
(``message.*``) and nothing else (``webhooks.services.event_types_normalize``), and
docs/webhooks.md describes each type's data. ``audit/tests/test_catalogue.py`` reads the
source of every app and fails when a type is recorded that is not listed here, or listed
and never recorded. New types are added here; a type is never renamed or dropped (the
event log and the webhook bodies are part of the external contract).
"""

from __future__ import annotations

# type -> when it is recorded
EVENT_TYPES: dict[str, str] = {
    # The mail path (ingest, mailboxes.pipeline)
    "ingest.received": "a message was accepted (SMTP, LMTP, IMAP pull, upload) and stored",
    "objectstore.uploaded": "its raw bytes are in object storage",
    "indexer.indexed": "it is parsed and searchable",
    "message.quarantined": "it could not be parsed; kept with the reason",
    "message.deleted": "a message was deleted (by a user or retention)",
    "message.dropped_login_mail": "our own sign-in or invitation mail arrived for this mailbox and was dropped unread",
    # Mailboxes
    "mailbox.created": "a mailbox appeared",
    "mailbox.deleted": "a mailbox was deleted",
    "mailbox.expired": "a temporary inbox expired",
    # Domains (tenants.services)
    "domain.verified": "a domain was verified",
    "domain.mx_lost": "a verified domain's MX stopped pointing at us",
    "domain.mx_restored": "its MX points at us again",
    "domain.suspended": "a domain was suspended (MX lost too long, or its TXT record gone)",
    # Mailbox pools and account bindings (mailboxes.bindings)
    "pool.provisioned": "a pool created mailboxes",
    "pool.exhausted": "a pool had no mailbox left for an account",
    "binding.created": "an account was bound to a mailbox",
    "binding.reassigned": "an account moved to another mailbox",
    "binding.released": "an account's binding was released",
    # IMAP pull connectors (ingest.imap)
    "connector.connected": "a connector logged in and is receiving",
    "connector.error": "a connector lost its server or met an error, and backs off",
    "connector.auth_failed": "a connector's credentials were refused",
    "connector.resynced": "a connector was asked to fetch its folders again",
    # Sending (outbound)
    "outbound.queued": "a message to send was accepted",
    "outbound.suppressed": "a recipient is suppressed, so not sent to",
    "outbound.delivered": "a recipient's server accepted the message",
    "outbound.deferred": "a delivery attempt failed for now; it is retried",
    "outbound.bounced": "a recipient cannot be reached (permanent failure, gave up, or a DSN)",
    # Webhooks about themselves: sent only to endpoints that name them
    "webhook.delivered": "a delivery got a 2xx",
    "webhook.failed": "a delivery gave up (dead)",
}


def event_type_pattern_known(pattern: str) -> bool:
    """Whether ``pattern``, an exact type or a prefix like ``message.*``, names a type of the catalogue."""
    if pattern.endswith(".*"):
        prefix = pattern[:-1]
        return any(name.startswith(prefix) for name in EVENT_TYPES)
    return pattern in EVENT_TYPES
