"""Sending through the API, queued, DKIM-signed and delivered by the real worker through Postfix
(the smarthost) to the sink (the remote MX), where every signature is verified with dkimpy."""

from __future__ import annotations

from email import message_from_bytes
from typing import Any

import pytest

from mailplatform.testing import ALL_QUEUES, start_celery_worker
from outbound.models import Recipient
from outbound.tests.conftest import BOUNCE_DOMAIN
from outbound.tests.helpers import dkim_key_publish, dkim_verifies, wait_until


@pytest.fixture
def smarthost_worker(live_env: dict[str, str], postfix: Any) -> Any:
    worker = start_celery_worker(
        queue=ALL_QUEUES,
        name="outbound-smarthost",
        env={**live_env, "OUTBOUND_URL": f"smtp://127.0.0.1:{postfix.port}", "OUTBOUND_BOUNCE_DOMAIN": BOUNCE_DOMAIN},
    )
    yield worker
    worker.stop()


def test_it_signs_and_delivers_through_the_smarthost_and_threads_a_reply(
    cast: Any, dns_zone: Any, sink: Any, smarthost_worker: Any, settings: Any, postfix: Any
) -> None:
    settings.OUTBOUND_BOUNCE_DOMAIN = BOUNCE_DOMAIN
    client = cast.client(cast.owner_key)
    rsa_key = dkim_key_publish(client, dns_zone, cast.domain, "rsa")
    assert rsa_key["record_value"].startswith("v=DKIM1; k=rsa; p=")

    body = {
        "from": "inbox@acme.example.test",
        "to": ["alice@remote.example.org"],
        "bcc": ["hidden@remote.example.org"],
        "subject": "Re: your question",
        "text": "Here is the answer.",
        "html": "<p>Here is the <b>answer</b>.</p>",
        "attachments": [{"filename": "a.txt", "content_type": "text/plain", "content": "aGVsbG8="}],
        "reply_to_message": str(cast.message.pk),
    }
    first = client.post("/api/v1/messages/send", body, format="json", HTTP_IDEMPOTENCY_KEY="send-1")
    assert first.status_code == 202, first.content
    sent = first.json()
    assert sorted(r["state"] for r in sent["recipients"]) == ["queued", "queued"]
    again = client.post("/api/v1/messages/send", body, format="json", HTTP_IDEMPOTENCY_KEY="send-1")
    assert again.status_code == 202 and again.json()["id"] == sent["id"]
    assert again["Idempotent-Replayed"] == "true"

    try:
        received = sink.wait_for(2, timeout=30)
    except AssertionError:
        rows = list(Recipient.objects.values_list("address", "state", "last_response"))
        raise AssertionError(f"{rows}\n{smarthost_worker.output[-3000:]}\n{postfix.log_text()[-3000:]}") from None
    assert sorted(item.rcpt for item in received) == ["alice@remote.example.org", "hidden@remote.example.org"]
    for item in received:
        assert dkim_verifies(item.content, dns_zone), item.content[:600]
        assert item.mail_from.startswith("bounces+") and item.mail_from.endswith("@" + BOUNCE_DOMAIN)
        headers = message_from_bytes(item.content)
        assert "Bcc" not in headers and "hidden@" not in f"{headers['To']} {headers.get('Cc', '')}"
        # The reply threads under the stored message (RFC 5322 section 3.6.4).
        assert headers["In-Reply-To"] == cast.message.message_id
        assert headers["References"].split()[-1] == cast.message.message_id
        assert f"s={rsa_key['selector']};" in headers["DKIM-Signature"].replace(" ", "")
    wait_until(
        lambda: Recipient.objects.filter(message_id=sent["id"], state="delivered").count() == 2, what="delivered"
    )
    detail = client.get(f"/api/v1/outbound-messages/{sent['id']}/").json()
    assert {r["state"] for r in detail["recipients"]} == {"delivered"}
    assert all(r["dkim_selector"] == rsa_key["selector"] for r in detail["recipients"])

    # Rotation: an Ed25519 key next to the RSA one; once verified it signs, the RSA key retires.
    sink.reset()
    ed_key = dkim_key_publish(client, dns_zone, cast.domain, "ed25519")
    keys = {
        k["selector"]: k["state"] for k in client.get(f"/api/v1/domains/{cast.domain.pk}/dkim-keys/").json()["results"]
    }
    assert keys == {rsa_key["selector"]: "retired", ed_key["selector"]: "active"}
    raw = (
        b"From: Inbox <inbox@acme.example.test>\r\nTo: bob@remote.example.org\r\nSubject: raw one\r\n"
        b"\r\nSent as it is.\r\n"
    )
    response = client.generic("POST", "/api/v1/messages/send", raw, content_type="message/rfc822")
    assert response.status_code == 202, response.content
    (item,) = sink.wait_for(1, timeout=60)
    assert item.rcpt == "bob@remote.example.org"
    assert "a=ed25519-sha256" in message_from_bytes(item.content)["DKIM-Signature"].replace(" ", "")
    assert dkim_verifies(item.content, dns_zone)
    # The outcome is recorded once the smarthost has answered DATA, a moment after the sink has it.
    wait_until(lambda: client.get("/api/v1/events/?type=outbound.delivered").json()["results"], what="event")
    events = {e["type"] for e in client.get("/api/v1/events/?type=outbound.delivered").json()["results"]}
    assert events == {"outbound.delivered"}
