"""Web fixtures: a fresh rate-limit cache per test, signed-in clients for each role, mail."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.test import Client


@pytest.fixture(autouse=True)
def _fresh_cache(settings: Any) -> None:
    # Rate-limit counters must not leak between tests (and clear() on the shared Redis would
    # flush the broker's database too), so each test gets its own in-process cache.
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": uuid.uuid4().hex}
    }
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"


@pytest.fixture
def signed_in(world: Any) -> Any:
    """signed_in("owner") -> a Client with that person of tenant A signed in (CSRF enforced)."""

    def make(who: str = "owner", *, csrf: bool = False) -> Client:
        client = Client(enforce_csrf_checks=csrf)
        if who == "outsider":
            from tenants.models import Membership
            from tenants.tests.factories import MembershipFactory

            user = MembershipFactory(tenant=world.outsider_tenant, role=Membership.Role.OWNER).user
        else:
            user = getattr(world, who)
        client.force_login(user)
        return client

    return make
