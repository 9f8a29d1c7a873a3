"""SPF, DKIM, DMARC and ARC verified by us in the parse step, against a real DNS server.

The Zone (mailplatform.testing) is an authoritative server on loopback; the keys are made by
the run; dkimpy signs. Every message goes through the real parse step (blob storage, the
database), so what is checked is what the API and search read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import authres
import pytest

from audit.models import Event
from mailboxes import authentication
from mailboxes.tests import authentication_helpers as helpers
from mailboxes.tests.factories import MailboxFactory

OUR_ID = helpers.OUR_ID
deliver = helpers.deliver


@pytest.fixture
def zone(dns_zone: Any, settings: Any) -> Iterator[Any]:
    yield helpers.zone_prepare(dns_zone, settings)
    authentication.dns_cache_clear()


@pytest.fixture
def mailbox(db: Any) -> Any:
    return MailboxFactory(local_part="inbox")


def test_it_passes_spf_dkim_and_dmarc_for_a_signed_message_from_an_allowed_address(zone: Any, mailbox: Any) -> None:
    key = helpers.rsa_key()
    helpers.publish_key(zone, key)
    message = deliver(mailbox, helpers.dkim_sign(helpers.message(), key))

    verdict = message.authentication
    assert verdict["sender_ip_known"] is True
    assert verdict["spf"] == {
        "result": "pass",
        "domain": "origin.test",
        "scope": "mailfrom",
        "ip": "127.0.0.1",
        "reason": verdict["spf"]["reason"],
    }
    [signature] = verdict["dkim"]
    assert signature["result"] == "pass"
    assert (signature["domain"], signature["selector"], signature["algorithm"]) == ("origin.test", "s1", "rsa-sha256")
    assert signature["aligned"] is True
    assert verdict["dmarc"]["result"] == "pass"
    assert verdict["dmarc"]["policy"] == "reject"
    assert verdict["dmarc"]["alignment"] == {"spf": True, "dkim": True, "spf_mode": "r", "dkim_mode": "r"}
    assert verdict["arc"]["result"] == "none"
    assert (message.auth_spf, message.auth_dkim, message.auth_dmarc, message.auth_arc) == (
        "pass",
        "pass",
        "pass",
        "none",
    )
    # Our own header, first among the headers shown, with our authserv-id.
    assert message.authentication_results.startswith(f"{OUR_ID}; spf=pass smtp.mailfrom=origin.test; dkim=pass")
    assert "dmarc=pass header.from=origin.test policy.dmarc=reject" in message.authentication_results
    assert message.headers[0] == ["Authentication-Results", message.authentication_results]
    event = Event.objects.get(type="indexer.indexed", message_id=message.pk)
    assert event.data["authentication"] == {"spf": "pass", "dkim": "pass", "dmarc": "pass", "arc": "none"}


def test_it_fails_dkim_and_dmarc_when_the_body_changed_after_signing(zone: Any, mailbox: Any) -> None:
    key = helpers.rsa_key()
    helpers.publish_key(zone, key)
    signed = helpers.dkim_sign(helpers.message(body="Pay invoice 1001\r\n"), key)
    tampered = signed.replace(b"invoice 1001", b"invoice 6666")
    # From an address SPF does not allow either, so nothing aligned passes.
    message = deliver(mailbox, tampered, remote_ip="192.0.2.77")

    [signature] = message.authentication["dkim"]
    assert signature["result"] == "fail"
    assert "body hash" in signature["reason"]
    assert message.auth_spf == "fail"
    assert message.authentication["dmarc"]["result"] == "fail"
    assert message.authentication["dmarc"]["reason"] == "no aligned DKIM signature; SPF fail"
    assert "dkim=fail reason=" in message.authentication_results


def test_it_fails_a_signature_made_with_another_key_than_the_published_one(zone: Any, mailbox: Any) -> None:
    helpers.publish_key(zone, helpers.rsa_key("published"))
    message = deliver(mailbox, helpers.dkim_sign(helpers.message(), helpers.rsa_key("other")))

    [signature] = message.authentication["dkim"]
    assert signature["result"] == "fail"
    assert signature["reason"] == "signature did not verify"
    # SPF still passes and aligns: DMARC passes on SPF alone.
    assert message.authentication["dmarc"]["result"] == "pass"
    assert message.authentication["dmarc"]["alignment"]["dkim"] is False


def test_it_reports_missing_records_as_what_they_are(zone: Any, mailbox: Any) -> None:
    zone.records.clear()  # no SPF, no DMARC and no key record anywhere
    message = deliver(mailbox, helpers.dkim_sign(helpers.message(), helpers.rsa_key()))

    [signature] = message.authentication["dkim"]
    assert signature["result"] == "permerror"
    assert signature["reason"] == "no key for signature at s1._domainkey.origin.test"
    assert message.auth_spf == "none"
    assert message.authentication["dmarc"]["result"] == "none"
    assert message.authentication["dmarc"]["reason"] == "no DMARC record"


def test_it_verifies_ed25519_signatures_next_to_rsa_ones(zone: Any, mailbox: Any) -> None:
    rsa_key, ed_key = helpers.rsa_key(), helpers.ed25519_key()
    helpers.publish_key(zone, rsa_key, selector="rsa")
    helpers.publish_key(zone, ed_key, selector="ed")
    raw = helpers.dkim_sign(helpers.message(), rsa_key, selector="rsa")
    raw = helpers.dkim_sign(raw, ed_key, selector="ed")
    message = deliver(mailbox, raw)

    results = [(s["selector"], s["algorithm"], s["result"]) for s in message.authentication["dkim"]]
    assert results == [("ed", "ed25519-sha256", "pass"), ("rsa", "rsa-sha256", "pass")]
    assert "header.d=origin.test header.a=ed25519-sha256 header.s=ed" in message.authentication_results


def test_it_fails_an_ed25519_signature_over_a_changed_header(zone: Any, mailbox: Any) -> None:
    key = helpers.ed25519_key()
    helpers.publish_key(zone, key, selector="ed")
    raw = helpers.dkim_sign(helpers.message(subject="Invoice"), key, selector="ed").replace(
        b"Subject: Invoice", b"Subject: Urgent invoice"
    )
    message = deliver(mailbox, raw, remote_ip="192.0.2.77")

    assert [s["result"] for s in message.authentication["dkim"]] == ["fail"]
    assert message.auth_dmarc == "fail"


def _three_hops(zone: Any) -> bytes:
    """Origin signs; a list (hop 2) rewrites subject and body; hops 1-3 each add an ARC set."""
    origin, forwarder = helpers.rsa_key(), helpers.rsa_key("forwarder")
    helpers.publish_key(zone, origin)
    for hop in ("hop1.test", "hop2.test", "hop3.test"):
        helpers.publish_key(zone, forwarder, domain=hop, selector="arc")
    raw = helpers.dkim_sign(helpers.message(subject="Agenda"), origin)
    raw = helpers.arc_hop(raw, forwarder, domain="hop1.test", results="spf=pass smtp.mailfrom=origin.test; dkim=pass")
    raw = raw.replace(b"Subject: Agenda", b"Subject: [team] Agenda") + b"-- \r\nteam list footer\r\n"
    raw = helpers.arc_hop(raw, forwarder, domain="hop2.test", results="arc=pass; dkim=pass header.d=origin.test")
    return helpers.arc_hop(raw, forwarder, domain="hop3.test", results="arc=pass; dkim=fail header.d=origin.test")


def test_it_validates_a_three_hop_arc_chain_that_dkim_no_longer_survives(zone: Any, mailbox: Any) -> None:
    message = deliver(mailbox, _three_hops(zone), remote_ip="192.0.2.10", mail_from="list@hop3.test")

    arc = message.authentication["arc"]
    assert arc["result"] == "pass", arc
    assert arc["instances"] == 3
    assert arc["sealers"] == ["hop1.test", "hop2.test", "hop3.test"]
    assert [s["result"] for s in message.authentication["dkim"]] == ["fail"]
    assert message.auth_dmarc == "fail"
    assert message.auth_arc == "pass"
    assert "arc=pass" in message.authentication_results


def test_it_fails_an_arc_chain_whose_seal_was_broken(zone: Any, mailbox: Any) -> None:
    raw = _three_hops(zone)
    # Change what hop 1 said about the message: its ARC-Authentication-Results is sealed.
    broken = raw.replace(b"i=1; hop1.test;\r\n spf=pass", b"i=1; hop1.test;\r\n spf=fail", 1)
    assert broken != raw
    message = deliver(mailbox, broken, remote_ip="192.0.2.10", mail_from="list@hop3.test")

    assert message.authentication["arc"]["result"] == "fail"
    assert message.authentication["arc"]["reason"]


def test_it_never_shows_an_authentication_results_field_claiming_our_authserv_id(zone: Any, mailbox: Any) -> None:
    forged = helpers.message(
        sender="Bank <alerts@bank.test>",
        extra=(
            f"Authentication-Results: {OUR_ID.upper()}; spf=pass smtp.mailfrom=bank.test; dkim=pass; dmarc=pass\r\n"
            f'Authentication-Results: (relay) "{OUR_ID}"; dmarc=pass\r\n'
            "Authentication-Results: relay.elsewhere.test; spf=pass\r\n"
        ),
    )
    helpers.publish_sender(zone, "bank.test", spf="v=spf1 -all", dmarc="v=DMARC1; p=reject")
    message = deliver(mailbox, forged, mail_from="alerts@bank.test")

    results = [value for name, value in message.headers if name.lower() == "authentication-results"]
    assert results == [message.authentication_results, "relay.elsewhere.test; spf=pass"]
    assert message.authentication_results.startswith(f"{OUR_ID}; spf=fail")
    assert message.auth_dmarc == "fail"


@pytest.mark.parametrize(
    ("source", "remote_ip", "why"),
    [
        ("lmtp", "10.0.0.5", "received over LMTP"),
        ("api", None, "uploaded through the API"),
        ("imap", None, "pulled over IMAP"),
    ],
)
def test_it_marks_mail_without_the_connecting_ip_of_the_sender(
    zone: Any, mailbox: Any, source: str, remote_ip: str | None, why: str
) -> None:
    key = helpers.rsa_key()
    helpers.publish_key(zone, key)
    message = deliver(mailbox, helpers.dkim_sign(helpers.message(), key), source=source, remote_ip=remote_ip)

    assert message.authentication["sender_ip_known"] is False
    assert message.authentication["spf"] is None
    assert message.auth_spf == ""
    assert message.auth_dkim == "pass"
    assert message.auth_dmarc == "pass"  # on the aligned DKIM signature alone
    assert message.authentication_results.startswith(f"{OUR_ID} ({why}: no connecting IP of the original sender);")
    assert "spf=" not in message.authentication_results


def test_it_says_dmarc_fail_without_spf_when_the_senders_ip_is_unknown(zone: Any, mailbox: Any) -> None:
    message = deliver(mailbox, helpers.message(), source="api", remote_ip=None)

    assert message.auth_dmarc == "fail"
    assert "SPF not evaluated (uploaded through the API" in message.authentication["dmarc"]["reason"]


def test_it_applies_the_subdomain_policy_and_strict_alignment(zone: Any, mailbox: Any) -> None:
    key = helpers.rsa_key()
    helpers.publish_key(zone, key)  # d=origin.test
    helpers.publish_sender(zone, spf="v=spf1 ip4:127.0.0.1 -all", dmarc="v=DMARC1; p=reject; sp=quarantine; adkim=s")
    helpers.publish_sender(zone, "news.origin.test", spf="v=spf1 -all", dmarc=None)
    raw = helpers.dkim_sign(helpers.message(sender="news@news.origin.test"), key)
    message = deliver(mailbox, raw, mail_from="bounce@news.origin.test")

    dmarc = message.authentication["dmarc"]
    assert (dmarc["result"], dmarc["policy"], dmarc["record_domain"]) == ("fail", "quarantine", "origin.test")
    assert dmarc["alignment"]["dkim_mode"] == "s"
    assert message.authentication["dkim"][0]["result"] == "pass"
    assert message.authentication["dkim"][0]["aligned"] is False  # origin.test is not news.origin.test


def test_it_aligns_spf_of_a_subdomain_in_relaxed_mode(zone: Any, mailbox: Any) -> None:
    helpers.publish_sender(zone, "bounces.origin.test", spf="v=spf1 ip4:127.0.0.0/8 ~all", dmarc=None)
    message = deliver(mailbox, helpers.message(), mail_from="x@bounces.origin.test")

    assert message.authentication["spf"]["domain"] == "bounces.origin.test"
    assert message.auth_dmarc == "pass"
    assert message.authentication["dmarc"]["alignment"]["spf"] is True


def test_it_reports_softfail_and_the_helo_identity_of_the_null_sender(zone: Any, mailbox: Any) -> None:
    helpers.publish_sender(zone, "mail.origin.test", spf="v=spf1 ip4:192.0.2.1 ~all", dmarc=None)
    message = deliver(mailbox, helpers.message(), mail_from="", helo="mail.origin.test")

    assert message.authentication["spf"]["scope"] == "helo"
    assert message.auth_spf == "softfail"
    assert "spf=softfail smtp.helo=mail.origin.test" in message.authentication_results


def test_it_answers_temperror_when_the_dns_does_not_answer(zone: Any, mailbox: Any, settings: Any) -> None:
    with helpers.failing_dns() as resolver:
        settings.DNS_RESOLVERS = [resolver]
        message = deliver(mailbox, helpers.dkim_sign(helpers.message(), helpers.rsa_key()))

    assert message.auth_spf == "temperror"
    assert message.authentication["dkim"][0]["result"] == "temperror"
    assert message.auth_dmarc == "temperror"


def test_it_stops_asking_a_silent_dns_within_its_time_budget(
    zone: Any, mailbox: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(authentication, "VERIFY_TIME_BUDGET", 2.0)
    settings.AUTH_DNS_TIMEOUT = 1
    raw = helpers.message()
    for selector in ("a", "b", "c", "d"):  # four key look-ups, one second each if asked
        raw = helpers.dkim_sign(raw, helpers.rsa_key(), selector=selector)
    with helpers.silent_dns() as resolver:
        settings.DNS_RESOLVERS = [resolver]
        started = time.monotonic()
        message = deliver(mailbox, raw)
        elapsed = time.monotonic() - started

    assert elapsed < 4, elapsed
    assert message.auth_spf == "temperror"
    assert {signature["result"] for signature in message.authentication["dkim"]} == {"temperror"}
    assert message.auth_dmarc == "temperror"


def test_it_verifies_one_delivery_to_several_mailboxes_once(zone: Any, mailbox: Any) -> None:
    key = helpers.rsa_key()
    helpers.publish_key(zone, key)
    raw = helpers.dkim_sign(helpers.message(), key)
    first = deliver(mailbox, raw)
    zone.records.clear()  # a second verification would find nothing now
    second = deliver(MailboxFactory(domain=mailbox.domain, local_part="other"), raw)

    assert first.authentication == second.authentication
    assert second.auth_dmarc == "pass"


def test_it_leaves_verification_off_when_asked_and_still_hides_forgeries(
    zone: Any, mailbox: Any, settings: Any
) -> None:
    settings.AUTH_VERIFY = False
    raw = helpers.message(
        extra=f"Authentication-Results: {OUR_ID}; dmarc=pass\r\nAuthentication-Results: relay.test; spf=none\r\n"
    )
    message = deliver(mailbox, raw)

    assert message.authentication is None
    assert (message.auth_spf, message.auth_dkim, message.auth_dmarc) == ("", "", "")
    assert message.authentication_results == "relay.test; spf=none"
    assert all(OUR_ID not in value for _, value in message.headers)
    event = Event.objects.get(type="indexer.indexed", message_id=message.pk)
    assert event.data["authentication"] == {"spf": None, "dkim": None, "dmarc": None, "arc": None}


def test_it_reads_the_authserv_id_behind_comments_and_quotes() -> None:
    assert authentication.authserv_id_of("mx.Example.; spf=pass") == "mx.example"
    assert authentication.authserv_id_of('(a (nested) comment) "mx.example" 1; none') == "mx.example"
    assert authentication.authserv_id_of("") == ""


def test_it_keeps_a_hostile_signature_from_breaking_our_header(zone: Any, mailbox: Any) -> None:
    raw = helpers.dkim_sign(helpers.message(), helpers.rsa_key())
    raw = raw.replace(b"d=origin.test;", b"d=a@origin.test; spf=pass (x;dmarc=pass;", 1)
    message = deliver(mailbox, raw)

    assert message.authentication["dkim"][0]["result"] == "permerror"
    parsed = authres.AuthenticationResultsHeader.parse_value(message.authentication_results)
    assert parsed.authserv_id == OUR_ID
    assert [(result.method, result.result) for result in parsed.results] == [
        ("spf", "pass"),
        ("dkim", "permerror"),
        ("dmarc", "pass"),
        ("arc", "none"),
    ]


def test_it_never_shows_a_received_spf_field_naming_our_host_as_the_verifier(zone: Any, mailbox: Any) -> None:
    raw = helpers.message(
        extra=(
            f"Received-SPF: pass ({OUR_ID.upper()}: domain of news@origin.test designates 192.0.2.1 as permitted"
            " sender)\r\n"
            f'Received-SPF: pass (relay) client-ip=192.0.2.1; receiver="{OUR_ID}."; identity=mailfrom\r\n'
            "Received-SPF: pass (relay.elsewhere.test: domain of origin.test designates 192.0.2.1 as permitted"
            f" sender, not {OUR_ID}: ) receiver=relay.elsewhere.test; identity=mailfrom\r\n"
        ),
    )
    message = deliver(mailbox, raw)

    shown = [value for name, value in message.headers if name.lower() == "received-spf"]
    assert len(shown) == 1 and shown[0].startswith("pass (relay.elsewhere.test:"), shown
    assert message.received_spf == shown[0]


def test_it_hides_a_received_spf_field_naming_us_with_verification_off(zone: Any, mailbox: Any, settings: Any) -> None:
    settings.AUTH_VERIFY = False
    raw = helpers.message(extra=f"Received-SPF: pass receiver={OUR_ID}\r\nReceived-SPF: none receiver=relay.test\r\n")
    message = deliver(mailbox, raw)

    assert message.received_spf == "none receiver=relay.test"
    assert all(OUR_ID not in value for _, value in message.headers)


def test_it_reads_the_verifier_of_a_received_spf_field() -> None:
    receivers = authentication.received_spf_receivers
    assert receivers("pass (mx.example.: domain of a@b designates 1.2.3.4)") == {"mx.example"}
    assert receivers('fail client-ip=1.2.3.4; receiver="MX.Example"; x=(receiver=no.test)') == {"mx.example"}
    assert receivers('softfail envelope-from="receiver=no.test"; receiver=mx.example') == {"mx.example"}
    assert receivers("neutral (comment without a host) identity=helo") == set()
