"""A pool with two bound accounts in the shared cast (for the route walks and the pool tests).

``pools_of(world)`` builds it once per world: a least-bound pool holding the cast's two
mailboxes, a ``google`` account bound to ``world.mailbox`` and a ``github`` account bound to
``world.sibling``, a ``github`` provider with rules, and one message with a code delivered to
each mailbox after the bindings were made (so the code proxy has something to answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailboxes.models import AccountBinding, AccountProvider, MailboxPool


@dataclass
class PoolCast:
    pool: MailboxPool
    own: AccountBinding  # on world.mailbox
    own_link: str
    sibling: AccountBinding  # on world.sibling
    sibling_link: str
    provider: AccountProvider


def pools_of(world: Any) -> PoolCast:
    built: PoolCast | None = getattr(world, "_pool_cast", None)
    if built is not None:
        return built
    from mailboxes.bindings import services
    from mailboxes.tests.helpers import message_deliver, simple_message
    from tenants.access import Principal

    system = Principal.system(world.tenant)
    pool = services.pool_create(
        principal=system, domain=world.domain, name="cast pool", mailboxes=[world.mailbox, world.sibling]
    )
    own = services.binding_link_or_create(principal=system, pool=pool, account_ref="acct-own", provider="google")
    sibling = services.binding_link_or_create(
        principal=system, pool=pool, account_ref="acct-sibling", provider="github"
    )
    assert own.binding.mailbox_id == world.mailbox.pk and sibling.binding.mailbox_id == world.sibling.pk
    provider = services.provider_save(principal=system, name="github", sender_domains=["github.com"])
    message_deliver(
        world.mailbox, simple_message("Your code", "Your verification code is 482910", to=world.mailbox.address)
    )
    message_deliver(
        world.sibling,
        simple_message(
            "GitHub code",
            "Your verification code is 771203",
            sender="GitHub <noreply@github.com>",
            to=world.sibling.address,
        ),
    )
    assert own.link is not None and sibling.link is not None
    built = PoolCast(pool, own.binding, own.link, sibling.binding, sibling.link, provider)
    world._pool_cast = built
    return built
