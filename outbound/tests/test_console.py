"""The console's suppression list: owners add and remove addresses, viewers only read."""

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
