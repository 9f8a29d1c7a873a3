"""The console's outbound pages: the suppression list (owners add and remove addresses, viewers
only read) and a domain's sending policy (any local part, or only its mailboxes)."""

from __future__ import annotations

from typing import Any

from django.test import Client

from outbound.models import Suppression


def test_it_lists_adds_and_removes_suppressions_in_the_console(world: Any) -> None:
    owner = Client()
    owner.force_login(world.owner)
    url = f"/console/{world.tenant.slug}/suppressions/"
    assert b"Nothing is suppressed" in owner.get(url).content
    assert owner.post(url, {"action": "add", "address": "Gone@Remote.example.org"}).status_code == 302
    suppression = Suppression.objects.get(tenant=world.tenant)
    assert (suppression.address, suppression.reason) == ("gone@remote.example.org", "manual")
    page = owner.get(url).content
    assert b"gone@remote.example.org" in page and b"Remove" in page
    assert owner.post(url, {"action": "add", "address": "not an address"}).status_code == 302
    assert Suppression.objects.count() == 1
    viewer = Client()
    viewer.force_login(world.viewer)
    shown = viewer.get(url).content
    assert b"gone@remote.example.org" in shown and b"Remove" not in shown
    viewer.post(url, {"action": "remove", "suppression": str(suppression.pk)})
    assert Suppression.objects.count() == 1  # a viewer cannot send, so cannot change the list
    owner.post(url, {"action": "remove", "suppression": str(suppression.pk)})
    assert not Suppression.objects.exists()


def test_it_lets_a_domain_manager_allow_any_local_part_to_send_from_the_domain_page(world: Any) -> None:
    from audit.models import AuditEntry
    from outbound.models import DomainSending

    url = f"/console/{world.tenant.slug}/domains/{world.domain.pk}/"
    owner = Client()
    owner.force_login(world.owner)
    page = owner.get(url).content
    assert b"Only the <strong>mailboxes</strong>" in page and b"Allow any address to send" in page
    send = {"from": "noreply@acme.example.test", "to": ["carol@remote.example.org"], "subject": "Hi", "text": "x"}
    api = world.client(world.owner_key)
    refused = api.post("/api/v1/messages/send", send, format="json")
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "sender_not_allowed")

    assert owner.post(url, {"action": "any_local_part", "enabled": "1"}).status_code == 302
    assert DomainSending.objects.get(domain=world.domain).any_local_part is True
    page = owner.get(url).content
    assert b"<strong>Any address</strong>" in page and b"Send only from mailboxes" in page
    assert api.post("/api/v1/messages/send", send, format="json").status_code == 202
    assert api.get(f"/api/v1/domains/{world.domain.pk}/sending").json() == {"any_local_part": True}
    entry = AuditEntry.objects.get(tenant=world.tenant, action="domain.sending_update")
    assert (entry.before, entry.after) == ({"any_local_part": False}, {"any_local_part": True})

    member = Client()
    member.force_login(world.member)  # no domains:manage: sees the policy, cannot change it
    shown = member.get(url).content
    assert b"<strong>Any address</strong>" in shown and b"Send only from mailboxes" not in shown
    assert member.post(url, {"action": "any_local_part", "enabled": "0"}).status_code == 403
    assert DomainSending.objects.get(domain=world.domain).any_local_part is True

    assert owner.post(url, {"action": "any_local_part", "enabled": "0"}).status_code == 302
    assert DomainSending.objects.get(domain=world.domain).any_local_part is False
    refused = api.post("/api/v1/messages/send", send, format="json")
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "sender_not_allowed")
