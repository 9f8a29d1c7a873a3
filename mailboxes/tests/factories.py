from __future__ import annotations

import factory

from mailboxes.models import Mailbox
from tenants.tests.factories import DomainFactory


class MailboxFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Mailbox

    domain = factory.SubFactory(DomainFactory)
    tenant = factory.SelfAttribute("domain.tenant")
    local_part = factory.Sequence(lambda n: f"box{n}")
    address = factory.LazyAttribute(lambda box: f"{box.local_part}@{box.domain.name}")
