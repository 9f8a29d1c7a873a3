"""Objects the cross-cutting route walks (tests/test_isolation.py, test_audit_walk.py) need."""

from __future__ import annotations

from typing import Any

from tenants.access import Principal


def outbound_message(world: Any, mailbox: Any) -> Any:
    """A message sent from ``mailbox`` (made once per world and mailbox)."""
    from outbound.services import message_queue

    cache = world.__dict__.setdefault("_outbound_messages", {})
    if mailbox.pk not in cache:
        queued = message_queue(
            principal=Principal.system(world.tenant),
            content=f"From: {mailbox.address}\r\nTo: x@remote.example.org\r\nSubject: s\r\n\r\nhi\r\n".encode(),
            from_address=mailbox.address,
            recipients=["x@remote.example.org"],
        )
        cache[mailbox.pk] = queued.message
    return cache[mailbox.pk]


def dkim_key(world: Any) -> Any:
    """A pending (deletable) key of tenant A's domain."""
    from outbound.services import dkim_key_create

    if "_dkim_key" not in world.__dict__:
        world._dkim_key = dkim_key_create(
            principal=Principal.system(world.tenant), domain=world.domain, algorithm="ed25519"
        )
    return world._dkim_key


def dkim_key_kwargs(world: Any) -> dict[str, Any]:
    return {"domain_id": world.domain.pk, "pk": dkim_key(world).pk}


def suppression(world: Any) -> Any:
    from outbound.services import suppression_add

    if "_suppression" not in world.__dict__:
        world._suppression = suppression_add(
            principal=Principal.system(world.tenant), address="gone@remote.example.org"
        )
    return world._suppression


SEND_BODY = {"from": "inbox@acme.example.test", "to": ["x@remote.example.org"], "subject": "s", "text": "t"}
