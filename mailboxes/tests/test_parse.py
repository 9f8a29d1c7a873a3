"""The parse and index steps over a corpus of real-world shaped messages (PostgreSQL, S3)."""

from __future__ import annotations

import hashlib
import urllib.request

import pytest

from audit.models import Event
from mailboxes import pipeline
from mailboxes.models import Message
from mailboxes.parse import message_bytes_parse
from mailboxes.tests.helpers import FIXTURES, fixture_bytes, message_deliver, message_store, simple_message

CORPUS = sorted(path.relative_to(FIXTURES).as_posix() for path in FIXTURES.rglob("*.eml"))
QUARANTINED = {"garbage.eml", "deep_nesting.eml", "no_headers_text.eml"}


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


@pytest.mark.parametrize("name", CORPUS)
def test_it_ends_every_fixture_indexed_or_quarantined_with_identical_raw_bytes(world, name):
    raw = fixture_bytes(name)
    message = message_deliver(world.mailbox, raw)
    expected = Message.State.QUARANTINED if name in QUARANTINED else Message.State.INDEXED
    assert message.state == expected, message.state_reason
    event_type = "message.quarantined" if expected == Message.State.QUARANTINED else "indexer.indexed"
    assert Event.objects.filter(message_id=message.pk, type=event_type).count() == 1
    if expected == Message.State.QUARANTINED:
        assert message.state_reason
    response = world.client(world.owner_key).get(f"/api/v1/messages/{message.pk}/raw/")
    assert response.status_code == 200, response.content
    downloaded = _download(response.json()["url"])
    assert hashlib.sha256(downloaded).hexdigest() == hashlib.sha256(raw).hexdigest()


def test_it_records_addresses_subject_dates_and_headers(world):
    message = message_deliver(world.mailbox, fixture_bytes("multipart_alternative.eml"))
    assert message.from_address == "alice@sender.example"
    assert message.from_name == "Alice Example"
    assert message.to == [{"name": "", "address": "inbox@acme.example.test"}]
    assert message.date.isoformat() == "2025-07-01T10:00:00+00:00"
    assert message.text.startswith("Plain body")
    assert "Open it" in message.html
    assert {"url": "https://example.com/html", "text": "Open it"} in message.links
    assert ["Subject", "Alternative parts"] in message.headers


def test_it_decodes_rfc2047_subjects_and_legacy_charsets():
    parsed = message_bytes_parse(fixture_bytes("iso_2022_jp.eml"))
    assert parsed.subject == "ですか"
    assert "認証コード" in parsed.text
    assert parsed.codes == ["583920"]
    koi8 = message_bytes_parse(fixture_bytes("koi8_r.eml"))
    assert koi8.subject == "Привет"
    assert koi8.codes == ["319457"]
    latin = message_bytes_parse(fixture_bytes("eight_bit.eml"))
    assert "Grüße aus Köln" in latin.text
    assert latin.codes == ["771204"]


def test_it_keeps_all_five_thousand_headers():
    parsed = message_bytes_parse(fixture_bytes("many_headers.eml"))
    assert sum(1 for name, _ in parsed.headers if name.startswith("X-Filler-")) == 5000
    assert parsed.text.strip() == "Body after many headers."


def test_it_stores_each_attachment_as_its_own_object(world):
    message = message_deliver(world.mailbox, fixture_bytes("nested_multipart.eml"))
    attachments = {a.filename: a for a in message.attachments.all()}
    assert set(attachments) == {"logo.png", "report.pdf"}
    assert attachments["logo.png"].is_inline
    assert attachments["logo.png"].content_id == "logo@x"
    assert not attachments["report.pdf"].is_inline
    assert message.has_attachments
    pdf = attachments["report.pdf"]
    url = world.client(world.owner_key).get(f"/api/v1/messages/{message.pk}/attachments/{pdf.pk}/").json()["url"]
    assert _download(url) == b"%PDF-1.4 quarterly report"
    assert pdf.sha256 == hashlib.sha256(b"%PDF-1.4 quarterly report").hexdigest()


def test_it_reads_rfc2231_filenames_and_calendar_parts(world):
    message = message_deliver(world.mailbox, fixture_bytes("rfc2231_filename.eml"))
    assert [a.filename for a in message.attachments.all()] == ["été résumé.txt"]
    invite = message_deliver(world.mailbox, fixture_bytes("calendar_tnef.eml"))
    assert {a.filename for a in invite.attachments.all()} >= {"winmail.dat"}
    types = {a.content_type for a in invite.attachments.all()}
    assert "application/ms-tnef" in types


def test_it_rewrites_cid_images_to_signed_attachment_urls_and_blocks_remote_images(world):
    message = message_deliver(world.mailbox, fixture_bytes("inline_image.eml"))
    client = world.client(world.owner_key)
    html = client.get(f"/api/v1/messages/{message.pk}/").json()["html"]
    assert "cid:" not in html
    assert "X-Amz-Signature" in html or "Signature=" in html
    assert ' src="https://tracker.example/pixel.gif"' not in html
    assert 'data-remote-src="https://tracker.example/pixel.gif"' in html
    opted_in = client.get(f"/api/v1/messages/{message.pk}/?remote_images=1").json()["html"]
    assert ' src="https://tracker.example/pixel.gif"' in opted_in


def test_it_makes_hostile_html_harmless():
    html = message_bytes_parse(fixture_bytes("hostile_html.eml")).html.lower()
    for needle in ("<script", "javascript:", "onload", "onerror", "expression(", "<svg", "<meta", "refresh",
                   "<form", "<input", "<iframe", "<style", "evil.example"):  # fmt: skip
        assert needle not in html, needle
    assert 'href="https://ok.example/"' in html


def test_it_strips_replies_threads_them_and_reads_x_tags(world):
    root = message_deliver(world.mailbox, simple_message("Project plan", message_id="<root@sender.example>"))
    reply = message_deliver(world.mailbox, fixture_bytes("reply.eml"), tags=["plus"])
    assert reply.stripped_text == "Sounds good, ship it."
    assert reply.thread_id == root.thread_id != ""
    assert reply.tags == ["plus", "project", "urgent"]
    no_refs = message_deliver(world.mailbox, simple_message("RE: project   PLAN", body="late reply"))
    assert no_refs.thread_id == root.thread_id
    other = message_deliver(world.mailbox, simple_message("Unrelated"))
    assert other.thread_id != root.thread_id


def test_it_extracts_codes_and_links():
    parsed = message_bytes_parse(fixture_bytes("verification_code.eml"))
    assert parsed.codes[0] == "482913"
    assert {"url": "https://app.example/verify?t=abc", "text": ""} in parsed.links


def test_it_quarantines_a_message_whose_raw_object_is_missing_and_never_drops_it(world):
    message = message_store(world.mailbox, simple_message())
    Message.objects.filter(pk=message.pk).update(storage_key="raw/missing/nothing.eml")
    assert pipeline.message_parse(message_id=message.pk) == "quarantined"
    message.refresh_from_db()
    assert message.state == Message.State.QUARANTINED
    assert "missing" in message.state_reason


def test_it_is_idempotent_when_a_task_runs_twice(world):
    message = message_store(world.mailbox, fixture_bytes("nested_multipart.eml"))
    assert pipeline.message_parse(message_id=message.pk) == "parsed"
    assert pipeline.message_parse(message_id=message.pk) == "skipped"
    assert pipeline.message_index(message_id=message.pk) is True
    assert pipeline.message_index(message_id=message.pk) is False
    assert message.attachments.count() == 2
    assert Event.objects.filter(message_id=message.pk, type="indexer.indexed").count() == 1


def test_it_parses_and_indexes_in_one_transaction_like_the_two_steps(world):
    """The task's one-step path writes the same searchable document as parse then index."""
    from audit.models import Event
    from mailboxes import pipeline
    from mailboxes.selectors import message_list
    from mailboxes.tests.helpers import message_deliver, message_store, simple_message
    from tenants.access import Principal

    raw = simple_message(
        "Quarterly zephyr report", "the aurora numbers", sender="Björn <bjorn@north.example>", message_id="<one@x>"
    )
    one_step = message_store(world.mailbox, raw)
    assert pipeline.message_parse(message_id=one_step.pk, index=True) == "indexed"
    one_step.refresh_from_db()
    two_steps = message_deliver(world.mailbox, raw)
    assert one_step.state == two_steps.state == "indexed"
    assert one_step.indexed_at is not None
    assert str(one_step.search_vector) == str(two_steps.search_vector)
    principal = Principal.system(world.tenant)
    for query in ("zephyr", "aurora", "from:bjorn@north.example", "subject:quarterly"):
        found = set(message_list(principal, query=query).values_list("pk", flat=True))
        assert found == {one_step.pk, two_steps.pk}, query
    assert Event.objects.filter(type="indexer.indexed", message_id=one_step.pk).count() == 1


def _corpus(name: str) -> bytes:
    return fixture_bytes(f"corpus/{name}")


def test_it_decodes_raw_utf8_headers_and_finds_them_by_search(world):
    from mailboxes.selectors import message_list
    from tenants.access import Principal

    message = message_deliver(world.mailbox, _corpus("utf8_raw_headers.eml"))
    assert message.subject == "Grüße aus Köln \u2013 Ihre Bestellung 日本語"
    assert (message.from_name, message.from_address) == ("René Müller", "rene@bäckerei.example")
    assert message.to[0] == {"name": "Zoë Ångström", "address": "zoe@example.org"}
    found = message_list(Principal.system(world.tenant), query="subject:Grüße").values_list("pk", flat=True)
    assert list(found) == [message.pk]


def test_it_reads_undeclared_latin1_headers_without_surrogates():
    parsed = message_bytes_parse(_corpus("latin1_raw_headers.eml"))
    assert parsed.subject == "Re: Café crème à 8€"
    assert parsed.from_name == "René Dupré"
    assert parsed.to == [{"name": "Françoise", "address": "francoise@example.fr"}]
    for value in (parsed.subject, parsed.from_name, *(v for _, v in parsed.headers)):
        assert "\ufffd" not in value and not any("\ud800" <= ch <= "\udfff" for ch in value), value


def test_it_indexes_hundreds_of_sibling_parts_and_quarantines_only_real_depth(world):
    siblings = message_deliver(world.mailbox, _corpus("many_shallow_parts.eml"))
    assert siblings.state == Message.State.INDEXED, siblings.state_reason
    assert "Item 219 of the digest" in siblings.text
    deep = message_deliver(world.mailbox, fixture_bytes("deep_nesting.eml"))
    assert deep.state == Message.State.QUARANTINED
    assert "nesting deeper than 200" in deep.state_reason


def test_it_reads_a_named_inline_text_part_as_the_body():
    parsed = message_bytes_parse(_corpus("named_text_parts.eml"))
    assert parsed.text.strip() == "Your verification code is 613207."
    assert parsed.codes == ["613207"]
    assert [a.filename for a in parsed.attachments] == ["notes.txt"]


def test_it_keeps_text_attachments_as_files_and_falls_back_to_one_when_there_is_no_body():
    cast = message_bytes_parse(fixture_bytes("cast_message.eml"))
    assert cast.text.strip() == "Your code is 246810."
    assert [a.filename for a in cast.attachments] == ["notes.txt"]
    only = message_bytes_parse(_corpus("attachment_only_text.eml"))
    assert only.text.strip() == "Export code 884213, 42 rows."
    assert only.codes == ["884213"]
    assert [a.filename for a in only.attachments] == ["export.txt"]


def test_it_decodes_rfc2231_and_rfc2047_file_names():
    parsed = message_bytes_parse(_corpus("rfc2231_nonascii_filename.eml"))
    assert [a.filename for a in parsed.attachments] == ["Rechnung für Jürgen € 500.pdf", "图片.png"]


_DEEP_SHAPES = {
    "nested-div": ("<div>", "x", "</div>"),
    "unclosed-blockquote": ("<blockquote>", "x", ""),
    "comment-hidden-ends": ("<div><!--</div>-->", "x", ""),
    "ignored-ends": ("<span><div></span>", "x", ""),
}


def _deep(shape: str, times: int) -> str:
    opening, middle, closing = _DEEP_SHAPES[shape]
    return opening * times + middle + closing * times


@pytest.mark.parametrize("shape", list(_DEEP_SHAPES))
def test_it_bounds_the_work_of_deeply_nested_html(shape):
    """html5ever (under nh3) walks its stack of open elements on every block start tag, so its
    work grows with the square of the nesting; the depth bound must hand it a document whose
    size does not grow with the input's. (How fast it is: bench/parse_nested_html.py.)"""
    from mailboxes.sanitize import MAX_HTML_DEPTH, html_depth_bound

    bounded = {times: html_depth_bound(_deep(shape, times)) for times in (50_000, 100_000)}
    # The tags the tree builder gets: at most an opening and a closing for each allowed level,
    # the same number for twice the input.
    tags = {times: html.count("<") for times, html in bounded.items()}
    assert tags[100_000] <= 2 * MAX_HTML_DEPTH, tags
    assert tags[50_000] == tags[100_000], tags
    raw = (
        "From: a@sender.example\r\nTo: inbox@acme.example.test\r\nSubject: deep\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n" + _deep(shape, 100_000)
    ).encode()
    parsed = message_bytes_parse(raw)
    assert parsed.html.count("<div") + parsed.html.count("<blockquote") <= 200
    assert parsed.text.strip().endswith("x") or shape == "ignored-ends"


@pytest.mark.parametrize("charset", ["rot13", "base64", "idna", "x-\x00nul", "utf-16"])
def test_it_reads_text_whose_charset_is_not_a_charset(charset):
    raw = (
        f"From: a@sender.example\r\nSubject: =?{charset}?Q?caf=C3=A9?=\r\n"
        f"Content-Type: text/plain; charset={charset}\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + "café 123456 code\r\n".encode()
    parsed = message_bytes_parse(raw)
    assert parsed.subject and parsed.text
    if charset != "utf-16":
        assert parsed.subject == "café"
        assert parsed.text.strip() == "café 123456 code"
