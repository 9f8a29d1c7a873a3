"""Verification codes in the shapes real senders use."""

from __future__ import annotations

import pytest

from mailboxes.codes import codes_extract


@pytest.mark.parametrize(
    ("subject", "text", "code"),
    [
        ("G-551234 is your Google verification code", "", "551234"),
        ("Verify your account", "G-551234 is your Google verification code.", "551234"),
        ("Your code", "Your verification code is 640213.", "640213"),
        ("Sign in", "Use code ABC-123 to sign in.", "ABC-123"),
        ("Security code", "Your security code: 123 456", "123456"),
    ],
)
def test_it_finds_the_code_a_form_asks_for(subject: str, text: str, code: str) -> None:
    assert codes_extract(subject, text)[0] == code


@pytest.mark.parametrize(
    "text",
    [
        "Your order A-2024 total was $12.50, see https://shop.example/code/G-551234",
        "Call x-12345 about your verification",  # lower-case prefix: an extension, not a sender code
    ],
)
def test_it_takes_no_prefixed_digits_that_are_not_a_code(text: str) -> None:
    assert codes_extract("Receipt", text) == []
