"""The name our mail servers give (greetings, EHLO, authserv-id) when SMTP_HOSTNAME is an address."""

from __future__ import annotations

from typing import Any

import pytest

from mailboxes.authentication import authserv_id
from mailplatform.hostnames import greeting_hostname


@pytest.mark.parametrize(
    ("configured", "mx_hosts", "greeting", "authserv"),
    [
        ("mx.example.com", ["mx1.example.net"], "mx.example.com", "mx.example.com"),
        ("127.0.0.1", ["mx.mailplatform.localhost"], "mx.mailplatform.localhost", "mx.mailplatform.localhost"),
        ("127.0.0.1", [], "[127.0.0.1]", "127.0.0.1"),
        ("::1", ["192.0.2.7"], "[IPv6:::1]", "::1"),
        ("MX.Example.COM.", [], "MX.Example.COM", "mx.example.com"),
    ],
)
def test_it_names_the_mail_host_by_a_domain_name_where_one_is_configured(
    settings: Any, configured: str, mx_hosts: list[str], greeting: str, authserv: str
) -> None:
    settings.SMTP_HOSTNAME = configured
    settings.MX_HOSTS = mx_hosts
    assert greeting_hostname() == greeting
    assert authserv_id() == authserv
