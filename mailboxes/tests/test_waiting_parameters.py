"""The long-poll endpoints' query parameters: a bad value answers 400 naming that parameter."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.django_db


def _routes(world: Any) -> dict[str, tuple[str, str]]:
    """Each long-poll route and the name of its waiting parameter."""
    return {
        "messages-wait": ("/api/v1/messages/wait/", "timeout"),
        "mailbox-code-latest": (f"/api/v1/mailboxes/{world.mailbox.pk}/codes/latest/", "wait"),
        "link-code-latest": ("/api/v1/links/lnk_nothing/codes/latest/", "wait"),
        "account-code-latest": ("/api/v1/accounts/acct-nothing/codes/latest/", "wait"),
    }


@pytest.mark.parametrize("route", ["messages-wait", "mailbox-code-latest", "link-code-latest", "account-code-latest"])
@pytest.mark.parametrize("value", ["abc", "-1", "301", "nan", "1e400"])
def test_it_names_the_waiting_parameter_it_refuses(world, route, value):
    path, parameter = _routes(world)[route]
    response = world.client(world.owner_key).get(path, {parameter: value})
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["message"].startswith(f"{parameter}: ")
    assert list(error["details"]) == [parameter]
    other = "timeout" if parameter == "wait" else "wait"
    assert other not in error["message"]


@pytest.mark.parametrize(("path", "parameter"), [("/api/v1/messages/wait/", "mailbox")])
def test_it_names_a_parameter_that_is_not_an_id(world, path, parameter):
    response = world.client(world.owner_key).get(path, {parameter: "not-an-id", "timeout": "0"})
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], list(error["details"])) == ("validation_error", [parameter])


@pytest.mark.parametrize("value", ["yesterday", "2026-13-01T00:00:00Z"])
def test_it_names_after_when_it_is_neither_a_time_nor_a_message(world, value):
    path = f"/api/v1/mailboxes/{world.mailbox.pk}/codes/latest/"
    response = world.client(world.owner_key).get(path, {"after": value})
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], error["message"]) == (
        "validation_error",
        "after: expected an ISO 8601 time or a message id.",
    )
    assert list(error["details"]) == ["after"]
