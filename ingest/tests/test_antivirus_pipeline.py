"""Antivirus after the 250: quarantine and tag modes in the parse, rescans, the API, /readyz.

Against the session's real clamd (``clamd_server``), real S3 and PostgreSQL. Messages are
stored as the drainer leaves them and parsed in this process; the spool-to-message path is
driven through the in-process SMTP server on a real socket.
"""

from __future__ import annotations

import smtplib
from datetime import timedelta
from typing import Any

import pytest

from audit.models import Event
from ingest.services import spool_drain
from ingest.tests.antivirus_messages import INFECTED, clean_message, oversized
from mailboxes import antivirus, pipeline
from mailboxes.models import Message
from mailboxes.tests.helpers import message_store
from mailplatform.testing import free_port
from mailplatform.testing_clamd import FOUND
from tenants.models import AntivirusMode

pytestmark = pytest.mark.django_db


@pytest.fixture
def scanning(settings: Any, clamd_server: Any) -> Any:
    settings.CLAMD_URL = clamd_server.tcp_url
    settings.ANTIVIRUS_FAIL_OPEN = False
    return clamd_server


def _mode(world: Any, mode: str) -> None:
    world.domain.antivirus_mode = mode
    world.domain.save(update_fields=["antivirus_mode", "updated_at"])
    antivirus._modes.clear()  # the parse remembers a mailbox's mode for a few seconds


def _parsed(world: Any, raw: bytes) -> Message:
    message = message_store(world.mailbox, raw)
    pipeline.message_parse(message_id=message.pk, index=True)
    message.refresh_from_db()
    return message


def _quarantine_events(message: Message) -> list[dict[str, Any]]:
    return [event.data for event in Event.objects.filter(message_id=message.pk, type="message.quarantined")]


@pytest.mark.parametrize("build", INFECTED.values(), ids=INFECTED.keys())
def test_it_quarantines_a_virus_before_parsing_it(world: Any, scanning: Any, build: Any) -> None:
    _mode(world, AntivirusMode.QUARANTINE)
    message = _parsed(world, build())
    assert (message.state, message.state_reason) == ("quarantined", "virus")
    assert (message.antivirus_verdict, message.antivirus_signature) == ("infected", FOUND)
    assert message.antivirus_scanned_at is not None
    assert not message.attachments.exists() and message.subject == ""  # never parsed
    [data] = _quarantine_events(message)
    assert (data["reason"], data["signature"]) == ("virus", FOUND)


def test_it_tags_a_virus_in_tag_mode_and_shows_the_verdict_in_the_api(world: Any, scanning: Any) -> None:
    world.tenant.antivirus_mode = AntivirusMode.TAG  # the tenant's mode; the domain sets none
    world.tenant.save(update_fields=["antivirus_mode", "updated_at"])
    message = _parsed(world, INFECTED["nested_base64"]())
    assert message.state == "indexed" and "virus" in message.tags
    body = world.client(world.owner_key).get(f"/api/v1/messages/{message.pk}/").json()
    assert body["antivirus"]["verdict"] == "infected" and body["antivirus"]["signature"] == FOUND
    assert "virus" in body["tags"]
    found = world.client(world.owner_key).get("/api/v1/messages/", {"q": "tag:virus"}).json()["results"]
    assert [item["id"] for item in found] == [str(message.pk)]


def test_it_marks_clean_mail_clean_and_leaves_mail_of_mode_off_unscanned(world: Any, scanning: Any) -> None:
    _mode(world, AntivirusMode.QUARANTINE)
    clean = _parsed(world, clean_message())
    assert (clean.state, clean.antivirus_verdict, clean.tags) == ("indexed", "clean", [])
    _mode(world, AntivirusMode.OFF)
    skipped = _parsed(world, INFECTED["zipped"]())
    assert (skipped.state, skipped.antivirus_verdict) == ("indexed", "")
    body = world.client(world.owner_key).get(f"/api/v1/messages/{skipped.pk}/").json()
    assert body["antivirus"] == {"verdict": "not_scanned", "signature": "", "scanned_at": None}


def test_it_never_calls_mail_over_the_stream_limit_clean(world: Any, scanning: Any) -> None:
    big = oversized(300 * 1024)  # over clamd's StreamMaxLength 256K
    _mode(world, AntivirusMode.TAG)
    tagged = _parsed(world, big)
    assert (tagged.state, tagged.antivirus_verdict, tagged.tags) == ("indexed", "too_large", ["unscanned"])
    _mode(world, AntivirusMode.QUARANTINE)
    held = _parsed(world, big + b"\r\n")
    assert (held.state, held.state_reason, held.antivirus_verdict) == ("quarantined", "unscanned", "too_large")


def test_it_holds_quarantine_mode_mail_while_clamd_is_stopped(world: Any, scanning: Any) -> None:
    _mode(world, AntivirusMode.QUARANTINE)
    message = message_store(world.mailbox, INFECTED["zipped"]())
    scanning.stop()
    try:
        with pytest.raises(antivirus.ScannerUnavailable):  # the parse task retries
            pipeline.message_parse(message_id=message.pk, index=True)
        message.refresh_from_db()
        assert (message.state, message.antivirus_verdict) == ("stored", "")
    finally:
        scanning.start()
    pipeline.message_parse(message_id=message.pk, index=True)
    message.refresh_from_db()
    assert (message.state, message.state_reason) == ("quarantined", "virus")


def test_it_fails_open_then_the_sweeper_quarantines_what_it_finds(world: Any, scanning: Any, settings: Any) -> None:
    settings.ANTIVIRUS_FAIL_OPEN = True
    _mode(world, AntivirusMode.QUARANTINE)
    infected = message_store(world.mailbox, INFECTED["plain_attachment"]())
    clean = message_store(world.mailbox, clean_message())
    scanning.stop()
    try:
        for message in (infected, clean):
            pipeline.message_parse(message_id=message.pk, index=True)
            message.refresh_from_db()
            assert (message.state, message.antivirus_verdict, message.tags) == ("indexed", "error", ["unscanned"])
        assert antivirus.messages_rescan_due(older_than=timedelta(0)) == 1  # still down: stops at the first
    finally:
        scanning.start()
    assert antivirus.messages_rescan_due(older_than=timedelta(0)) == 2
    infected.refresh_from_db()
    clean.refresh_from_db()
    assert (infected.state, infected.state_reason, infected.antivirus_verdict) == ("quarantined", "virus", "infected")
    assert _quarantine_events(infected)[0]["signature"] == FOUND
    assert (clean.state, clean.antivirus_verdict, clean.tags) == ("indexed", "clean", [])
    assert antivirus.messages_rescan_due(older_than=timedelta(0)) == 0


def test_it_rescans_on_demand_through_the_api(world: Any, scanning: Any, settings: Any) -> None:
    _mode(world, AntivirusMode.TAG)
    message = message_store(world.mailbox, INFECTED["zipped"]())
    settings.CLAMD_URL = f"tcp://127.0.0.1:{free_port()}"  # nobody there: tag mode goes on, unscanned
    pipeline.message_parse(message_id=message.pk, index=True)
    client = world.client(world.owner_key)
    answer = client.post(f"/api/v1/messages/{message.pk}/rescan/")
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "antivirus_unavailable"
    settings.CLAMD_URL = scanning.unix_url
    answer = client.post(f"/api/v1/messages/{message.pk}/rescan/")
    assert answer.status_code == 200, answer.content
    assert answer.json()["antivirus"]["verdict"] == "infected" and answer.json()["tags"] == ["virus"]
    reader = world.client(world.key(["messages:read"]))
    assert reader.post(f"/api/v1/messages/{message.pk}/rescan/").status_code == 403
    outsider = world.client(world.outsider_key)
    assert outsider.post(f"/api/v1/messages/{message.pk}/rescan/").status_code == 404
    settings.CLAMD_URL = ""
    answer = client.post(f"/api/v1/messages/{message.pk}/rescan/")
    assert answer.status_code == 409 and answer.json()["error"]["code"] == "antivirus_not_configured"


def test_it_carries_the_verdict_made_before_the_250_onto_the_message(
    world: Any, scanning: Any, smtp_server: Any, settings: Any
) -> None:
    _mode(world, AntivirusMode.REJECT)
    settings.ANTIVIRUS_FAIL_OPEN = True
    server = smtp_server()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        smtp.sendmail("a@sender.example", ["inbox@acme.example.test"], clean_message())
    assert spool_drain(server.spool) == {"stored": 1}
    message = Message.objects.get(mailbox=world.mailbox)
    assert message.antivirus_verdict == "clean" and message.antivirus_scanned_at is not None
    pipeline.message_parse(message_id=message.pk, index=True)  # not scanned a second time
    message.refresh_from_db()
    assert (message.state, message.antivirus_verdict) == ("indexed", "clean")


def test_it_shows_clamd_in_readyz_without_making_the_node_unready(world: Any, scanning: Any, settings: Any) -> None:
    body = world.client().get("/readyz").json()
    assert body["antivirus"]["ok"] is True and body["antivirus"]["version"].startswith("ClamAV ")
    settings.CLAMD_URL = f"tcp://127.0.0.1:{free_port()}"
    body = world.client().get("/readyz").json()
    assert body["antivirus"]["ok"] is False and "antivirus" not in body["failed"]
    assert "clamd_unavailable" in [warning["code"] for warning in body["warnings"]]
    settings.CLAMD_URL = ""
    assert "antivirus" not in world.client().get("/readyz").json()


def test_it_counts_scans_infected_errors_and_scan_time_in_metrics(world: Any, scanning: Any, settings: Any) -> None:
    _mode(world, AntivirusMode.TAG)
    _parsed(world, INFECTED["zipped"]())
    settings.CLAMD_URL = f"tcp://127.0.0.1:{free_port()}"
    _parsed(world, clean_message())
    text = world.client().get("/metrics").content.decode()
    infected = [line for line in text.splitlines() if line.startswith("antivirus_scans_total{")]
    assert any('result="infected"' in line and 'stage="pipeline"' in line for line in infected), infected
    assert any('result="error"' in line for line in infected), infected
    assert "antivirus_scan_seconds_bucket{" in text


def test_it_sets_the_modes_through_the_api_and_smtp_follows_them(world: Any, scanning: Any) -> None:
    client = world.client(world.owner_key)
    answer = client.patch("/api/v1/tenant/", {"antivirus_mode": "quarantine"})
    assert answer.status_code == 200 and answer.json()["antivirus_mode"] == "quarantine"
    answer = client.patch(f"/api/v1/domains/{world.domain.pk}/", {"antivirus_mode": "reject"})
    assert answer.status_code == 200 and answer.json()["antivirus_mode"] == "reject"
    assert client.patch(f"/api/v1/domains/{world.domain.pk}/", {"antivirus_mode": "maybe"}).status_code == 400
    from ingest.directory import RecipientDirectory

    directory = RecipientDirectory(check_misses=False)
    assert directory.reload()
    assert directory.decide("inbox@acme.example.test").antivirus_mode == "reject"
    client.patch(f"/api/v1/domains/{world.domain.pk}/", {"antivirus_mode": ""})
    assert directory.reload() and directory.decide("inbox@acme.example.test").antivirus_mode == "quarantine"
    assert mailbox_mode_of(world) == "quarantine"


def mailbox_mode_of(world: Any) -> str:
    return antivirus.mailbox_mode(world.mailbox.pk)


def test_it_shows_the_antivirus_verdict_as_a_badge_beside_the_trust_badges(
    world: Any, scanning: Any, dns_zone: Any, settings: Any
) -> None:
    from html import unescape

    from django.test import Client

    from mailboxes import authentication
    from mailboxes.tests import authentication_helpers

    authentication_helpers.zone_prepare(dns_zone, settings)
    _mode(world, AntivirusMode.TAG)
    try:
        infected = authentication_helpers.deliver(world.mailbox, INFECTED["nested_base64"]())
        clean = authentication_helpers.deliver(world.mailbox, clean_message())
    finally:
        authentication.dns_cache_clear()
    client = Client()
    client.force_login(world.owner)

    def badges(message: Message) -> str:
        page = unescape(client.get(f"/inbox/{world.tenant.slug}/m/{message.pk}/").content.decode())
        return page.split('<ul class="badges">', 1)[1].split("</ul>", 1)[0]

    bad = badges(infected)
    assert (
        f'<li class="badge fail" data-antivirus="infected"><strong>Antivirus</strong> infected'
        f' <span class="detail">{FOUND}</span>'
    ) in bad
    assert "<strong>SPF</strong>" in bad and "<strong>ARC</strong> none" in bad  # beside the trust badges
    good = badges(clean)
    assert '<li class="badge pass" data-antivirus="clean"><strong>Antivirus</strong> clean' in good
    assert FOUND not in good
    Message.objects.filter(pk=clean.pk).update(antivirus_verdict="error")
    assert '<li class="badge neutral" data-antivirus="error"><strong>Antivirus</strong> scan failed' in badges(clean)
    Message.objects.filter(pk=clean.pk).update(antivirus_verdict="")
    assert 'data-antivirus="not_scanned"><strong>Antivirus</strong> not scanned' in badges(clean)


def test_it_carries_the_antivirus_verdict_in_the_indexed_event(world: Any, scanning: Any) -> None:
    def indexed(message: Message) -> dict[str, Any]:
        return Event.objects.get(message_id=message.pk, type="indexer.indexed").data

    _mode(world, AntivirusMode.TAG)
    infected = _parsed(world, INFECTED["zipped"]())
    assert indexed(infected)["antivirus"] == {"verdict": "infected", "signature": FOUND}
    assert set(indexed(infected)["authentication"]) == {"spf", "dkim", "dmarc", "arc"}  # beside the trust summary
    assert indexed(_parsed(world, clean_message()))["antivirus"] == {"verdict": "clean", "signature": ""}
    _mode(world, AntivirusMode.OFF)
    assert indexed(_parsed(world, clean_message() + b"\r\n"))["antivirus"] == {
        "verdict": "not_scanned",
        "signature": "",
    }
    # Parsed first, indexed by the indexer step: the same data from the stored columns.
    _mode(world, AntivirusMode.TAG)
    message = message_store(world.mailbox, INFECTED["plain_attachment"]())
    assert pipeline.message_parse(message_id=message.pk, index=False) == "parsed"
    assert pipeline.message_index(message_id=message.pk)
    assert indexed(message)["antivirus"] == {"verdict": "infected", "signature": FOUND}
