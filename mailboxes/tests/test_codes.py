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


def test_it_reads_no_more_of_a_long_html_body_than_its_links_need() -> None:
    import time

    from mailboxes.codes import MAX_LINKS, links_extract

    html = "".join(f'<p><a href="https://shop.example/item/{number}">Item {number}</a></p>' for number in range(40_000))
    started = time.process_time()
    links = links_extract("", html)
    spent = time.process_time() - started

    assert len(links) == MAX_LINKS
    assert links[0] == {"url": "https://shop.example/item/0", "text": "Item 0"}
    assert links[-1]["url"] == f"https://shop.example/item/{MAX_LINKS - 1}"
    assert spent < 0.5, f"{spent:.2f} s of CPU for the first {MAX_LINKS} links"


def test_it_finds_a_code_at_the_start_of_a_body_longer_than_it_searches() -> None:
    from mailboxes.codes import MAX_CODE_TEXT

    text = "Your verification code is 640213.\n" + "see https://shop.example/x " * (MAX_CODE_TEXT // 10)
    assert codes_extract("Welcome", text) == ["640213"]
