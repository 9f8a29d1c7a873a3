"""HTTPS to a pinned address: the certificate is checked for the URL's host name (SNI), the
connection goes to the resolved IP; per-message order within a batch; backlog metrics."""

from __future__ import annotations

import ssl

import pytest
from django.test import override_settings

from webhooks import delivery as sending
from webhooks import metrics, transport
from webhooks.models import Attempt, Delivery
from webhooks.tests.conftest import Receiver, make_endpoint, record, self_signed_certificate, verify

pytestmark = pytest.mark.django_db


@pytest.fixture
def tls_receiver(tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = Receiver("127.0.0.1", tls=context)
    server.ca_file = cert
    yield server
    server.close()


def test_it_sends_https_to_the_pinned_address_with_the_host_name_for_sni_and_host(world, tls_receiver):
    url = tls_receiver.url("/tls", host="localhost")
    target = transport.url_resolve(url)
    assert target.address in {"127.0.0.1", "::1"}
    with override_settings(WEBHOOK_CA_FILE=tls_receiver.ca_file):
        _, secret = make_endpoint(world, url)
        delivery = sending.delivery_send(Delivery.objects.get(event=record(world)).pk)
    assert delivery.state == Delivery.State.DELIVERED, Attempt.objects.get(delivery=delivery).error
    (request,) = tls_receiver.wait_for(1)
    assert request.headers["host"] == f"localhost:{tls_receiver.port}"
    verify(secret, request)


def test_it_refuses_a_certificate_that_does_not_name_the_host(world, tls_receiver):
    # The certificate names "localhost"; the URL names 127.0.0.1, so verification must fail.
    with override_settings(WEBHOOK_CA_FILE=tls_receiver.ca_file):
        make_endpoint(world, tls_receiver.url("/tls"))
        delivery = sending.delivery_send(Delivery.objects.get(event=record(world)).pk)
    assert delivery.state == Delivery.State.PENDING
    assert "CERTIFICATE_VERIFY_FAILED" in Attempt.objects.get(delivery=delivery).error
    assert tls_receiver.received == []


def test_it_sends_one_messages_events_in_log_order_within_a_batch(world, receiver):
    import uuid

    from django.db import transaction

    from audit.services import event_record

    make_endpoint(world, receiver.url())
    message_id = uuid.uuid4()
    with transaction.atomic():
        events = [
            event_record(tenant_id=world.tenant.pk, type=name, mailbox_id=world.mailbox.pk, message_id=message_id)
            for name in ("ingest.received", "objectstore.uploaded", "indexer.indexed")
        ]
        others = [record(world, "mailbox.created") for _ in range(5)]
    ids = [str(d.pk) for d in Delivery.objects.filter(event__in=[*events, *others])]
    sending.deliveries_send(ids)
    received = receiver.wait_for(8)
    mine = [r.headers["webhook-id"] for r in received if r.json["data"].get("message") == str(message_id)]
    assert mine == [event.public_id for event in events]


def test_it_reports_pending_dead_and_the_oldest_due_age(world, receiver, frozen_clock):
    make_endpoint(world, receiver.url())
    record(world)
    record(world)
    Delivery.objects.filter(pk=Delivery.objects.first().pk).update(state=Delivery.State.DEAD)
    frozen_clock.advance(42)
    values = {family.name: family.samples[0].value for family in metrics.BacklogCollector().collect()}
    assert values["mailplatform_webhook_pending"] == 1
    assert values["mailplatform_webhook_dead"] == 1
    assert values["mailplatform_webhook_oldest_pending_age_seconds"] == pytest.approx(42, abs=1)
