"""Per-IP limits count an IPv6 client by its /64 (RFC 6177: an end site gets at least that)."""

from __future__ import annotations

from typing import Any

import pytest
from django.core import mail
from django.test import Client

from mailplatform.clientip import rate_limit_subject
from webinbox.models import TempInbox
from webinbox.services import outbound_flush


@pytest.mark.parametrize(
    ("address", "subject"),
    [
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::1%eth0", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("203.0.113.9", "203.0.113.9"),
        (None, "-"),
        ("not an address", "-"),
    ],
)
def test_it_keys_a_client_by_its_ipv4_address_or_ipv6_network(address: str | None, subject: str) -> None:
    assert rate_limit_subject(address) == subject


def test_it_follows_rate_limit_ipv6_prefix(settings: Any) -> None:
    settings.RATE_LIMIT_IPV6_PREFIX = 56
    assert rate_limit_subject("2001:db8:1:2ff::1") == "2001:db8:1:200::/56"
    settings.RATE_LIMIT_IPV6_PREFIX = 128
    assert rate_limit_subject("2001:db8:1:2::1") == "2001:db8:1:2::1/128"


def test_it_limits_temporary_inboxes_per_ipv6_64_not_per_address(db: Any, settings: Any) -> None:
    settings.TEMP_INBOX_RATE_PER_HOUR = 2
    # Three addresses of one /64: the third is the same client picking a new address.
    for index, address in enumerate(("2001:db8:7:1::1", "2001:db8:7:1::2", "2001:db8:7:1:ffff::3")):
        answer = Client(REMOTE_ADDR=address).post("/")
        assert answer.status_code == (302 if index < 2 else 429), address
    assert Client(REMOTE_ADDR="2001:db8:7:2::1").post("/").status_code == 302  # the next /64
    assert TempInbox.objects.count() == 3


@pytest.mark.django_db(transaction=True)  # the sign-in mail is sent from a thread of its own
def test_it_limits_sign_in_link_requests_per_ipv6_64(world: Any, settings: Any) -> None:
    settings.LOGIN_RATE_PER_IP = 1
    first = Client(REMOTE_ADDR="2001:db8:9:1::10")
    first.post("/login/", {"email": world.owner.email})
    second = Client(REMOTE_ADDR="2001:db8:9:1::11")
    second.post("/login/", {"email": world.member.email})
    outbound_flush()
    assert [message.to for message in mail.outbox] == [[world.owner.email]]
