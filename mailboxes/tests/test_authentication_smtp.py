"""End to end: signed mail over real SMTP to runsmtp, verified against a real DNS server.

runsmtp (a process, with its drainer) takes the mail and stores it; the parse step runs here
on the same database, with verification on and the Zone as its resolver. Every case of the
issue in one SMTP session: valid, tampered body, wrong key, missing key record, ed25519, a
three-hop ARC chain, a forged Authentication-Results claiming our authserv-id; and a domain
with dmarc_reject refusing a DMARC failure at DATA in the same process.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from typing import Any

import pytest

from mailboxes import authentication, pipeline
from mailboxes.models import Message
from mailboxes.tests import authentication_helpers as helpers
from mailboxes.tests.helpers import messages_wait_stored
from tenants.models import Domain

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def zone(dns_zone: Any, settings: Any) -> Iterator[Any]:
    yield helpers.zone_prepare(dns_zone, settings)
    authentication.dns_cache_clear()


def _cases(zone: Any, to: str) -> dict[str, bytes]:
    rsa, ed = helpers.rsa_key(), helpers.ed25519_key()
    helpers.publish_key(zone, rsa)
    helpers.publish_key(zone, ed, selector="ed")
    helpers.publish_key(zone, helpers.rsa_key("other"), selector="rotated")

    def signed(subject: str, key: Any = rsa, selector: str = "s1", **kwargs: Any) -> bytes:
        return helpers.dkim_sign(helpers.message(to=to, subject=subject, **kwargs), key, selector=selector)

    forwarder = helpers.rsa_key("forwarder")
    for hop in ("hop1.test", "hop2.test", "hop3.test"):
        helpers.publish_key(zone, forwarder, domain=hop, selector="arc")
    chain = signed("Chain")
    chain = helpers.arc_hop(chain, forwarder, domain="hop1.test", results="spf=pass; dkim=pass")
    chain = chain.replace(b"Subject: Chain", b"Subject: [list] Chain")
    chain = helpers.arc_hop(chain, forwarder, domain="hop2.test", results="arc=pass; dkim=pass")
    chain = helpers.arc_hop(chain, forwarder, domain="hop3.test", results="arc=pass; dkim=fail")
    return {
        "Valid": signed("Valid"),
        "Tampered": signed("Tampered", body="Amount: 10 EUR\r\n").replace(b"10 EUR", b"9000 EUR"),
        "Wrong key": signed("Wrong key", helpers.rsa_key("not published"), "rotated"),
        "Missing key": signed("Missing key", selector="gone"),
        "Ed25519": signed("Ed25519", ed, "ed"),
        "[list] Chain": chain,
        "Forged": helpers.message(
            to=to,
            subject="Forged",
            extra=f"Authentication-Results: {helpers.OUR_ID}; spf=pass; dkim=pass header.d=origin.test; dmarc=pass\r\n",
        ),
    }


def test_it_verifies_every_case_of_mail_received_over_smtp(world: Any, zone: Any, runsmtp: Any) -> None:
    Domain.objects.filter(pk=world.outsider_domain.pk).update(dmarc_reject=True)
    server = runsmtp(DNS_RESOLVERS=f"127.0.0.1:{zone.port}", SMTP_HOSTNAME=helpers.OUR_ID)
    server.start()
    cases = _cases(zone, world.mailbox.address)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        smtp.ehlo("mail.origin.test")
        for raw in cases.values():
            smtp.mail("bounce@origin.test")
            smtp.rcpt(world.mailbox.address)
            code, reply = smtp.data(raw)
            assert code == 250, reply
        # The outsider's domain refuses DMARC failures at DATA: this one fails (SPF allows
        # 127.0.0.1 for origin.test, so the forgery comes from an address it does not allow).
        helpers.publish_sender(zone, "bank.test", spf="v=spf1 ip4:192.0.2.1 -all", dmarc="v=DMARC1; p=reject")
        smtp.mail("alerts@bank.test")
        smtp.rcpt(world.outsider_mailbox.address)
        code, reply = smtp.data(helpers.message(sender="alerts@bank.test", to=world.outsider_mailbox.address))
        assert (code, reply[:5]) == (550, b"5.7.1"), reply

    stored = messages_wait_stored(len(cases))
    assert {message.mailbox_id for message in stored} == {world.mailbox.pk}  # nothing of the refused one
    for message in stored:
        assert message.remote_ip == "127.0.0.1" and message.helo == "mail.origin.test"
        assert pipeline.message_parse(message_id=message.pk, index=True) == "indexed"
    by_subject = {message.subject: message for message in Message.objects.all()}

    def dkim_results(subject: str) -> list[str]:
        return [signature["result"] for signature in by_subject[subject].authentication["dkim"]]

    valid = by_subject["Valid"]
    assert (valid.auth_spf, valid.auth_dkim, valid.auth_dmarc, valid.auth_arc) == ("pass", "pass", "pass", "none")
    assert valid.authentication_results.startswith(f"{helpers.OUR_ID}; spf=pass smtp.mailfrom=origin.test")
    assert dkim_results("Tampered") == ["fail"]
    assert "body hash" in by_subject["Tampered"].authentication["dkim"][0]["reason"]
    assert dkim_results("Wrong key") == ["fail"]
    assert dkim_results("Missing key") == ["permerror"]
    assert by_subject["Ed25519"].authentication["dkim"][0]["algorithm"] == "ed25519-sha256"
    assert dkim_results("Ed25519") == ["pass"]
    chain = by_subject["[list] Chain"].authentication["arc"]
    assert (chain["result"], chain["instances"], chain["sealers"]) == (
        "pass",
        3,
        ["hop1.test", "hop2.test", "hop3.test"],
    )
    assert dkim_results("[list] Chain") == ["fail"]
    forged = by_subject["Forged"]
    shown = [value for name, value in forged.headers if name.lower() == "authentication-results"]
    assert shown == [forged.authentication_results]  # ours alone: the forged one is gone
    assert forged.auth_dkim == "none" and "dkim=pass" not in forged.authentication_results
