"""Sending to a real HTTP receiver on loopback: signatures, retries, backoff, 410, 429, 302, dead."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.test import override_settings

from audit.models import Event
from webhooks import delivery as sending
from webhooks.models import Attempt, Delivery, Endpoint
from webhooks.tests.conftest import Scripted, make_endpoint, record, verify

pytestmark = pytest.mark.django_db


def _dispatch() -> list:
    """Run the beat dispatcher in-process: claim due deliveries and send each."""
    return [sending.delivery_send(delivery_id, claim) for delivery_id, claim in sending.deliveries_claim_due()]


def test_it_delivers_the_event_json_signed_per_standard_webhooks(world, receiver, frozen_clock):
    _endpoint, secret = make_endpoint(world, receiver.url())
    event = record(world, "ingest.received", queue_id="Q1")
    (delivery,) = Delivery.objects.filter(event=event)
    assert sending.delivery_send(delivery.pk).state == Delivery.State.DELIVERED
    (request,) = receiver.wait_for(1)
    assert verify(secret, request) == event.as_json()
    assert request.headers["webhook-id"] == event.public_id
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("mailplatform-webhooks/")
    assert request.headers["host"] == f"127.0.0.1:{receiver.port}"
    assert len(request.body) < 20_000
    attempt = Attempt.objects.get(delivery=delivery)
    assert attempt.succeeded and attempt.status_code == 200 and attempt.response_body == "ok"
    # Success is itself an event (not delivered to the catch-all endpoint: webhook.* is opt-in).
    delivered = Event.objects.get(type="webhook.delivered")
    assert delivered.data["event"] == event.public_id
    assert not Delivery.objects.filter(event=delivered).exists()


def test_it_retries_500_500_200_with_the_same_id_respecting_the_backoff(world, receiver, frozen_clock):
    endpoint, secret = make_endpoint(world, receiver.url())
    receiver.respond(Scripted(500, body=b"boom"), Scripted(500))
    event = record(world)
    delivery = Delivery.objects.get(event=event)

    assert sending.delivery_send(delivery.pk).state == Delivery.State.PENDING  # immediate attempt: 500
    delivery.refresh_from_db()
    wait = (delivery.next_attempt_at - frozen_clock.now()).total_seconds()
    assert 4.5 <= wait <= 5.5  # 5 s with +-10% jitter
    frozen_clock.advance(4.4)
    assert _dispatch() == []  # not due yet: the backoff holds
    frozen_clock.advance(1.2)
    assert [d.state for d in _dispatch()] == [Delivery.State.PENDING]  # second attempt: 500
    delivery.refresh_from_db()
    wait = (delivery.next_attempt_at - frozen_clock.now()).total_seconds()
    assert 270 <= wait <= 330  # 5 min
    frozen_clock.advance(260)
    assert _dispatch() == []
    frozen_clock.advance(80)
    assert [d.state for d in _dispatch()] == [Delivery.State.DELIVERED]

    requests = receiver.wait_for(3)
    assert len(requests) == 3
    assert {r.headers["webhook-id"] for r in requests} == {event.public_id}
    for request in requests:
        verify(secret, request)
    attempts = list(Attempt.objects.filter(delivery=delivery).order_by("number"))
    assert [(a.number, a.status_code, a.succeeded) for a in attempts] == [
        (1, 500, False),
        (2, 500, False),
        (3, 200, True),
    ]
    assert attempts[0].response_body == "boom"
    endpoint.refresh_from_db()
    assert endpoint.failing_since is None


def test_it_disables_the_endpoint_on_410(world, receiver, frozen_clock):
    endpoint, _ = make_endpoint(world, receiver.url())
    receiver.respond(Scripted(410))
    first, second = record(world), record(world)
    assert sending.delivery_send(Delivery.objects.get(event=first).pk).state == Delivery.State.DEAD
    endpoint.refresh_from_db()
    assert not endpoint.enabled
    assert "410" in endpoint.disabled_reason
    # The other delivery waits (paused), nothing more is sent, and no new deliveries appear.
    assert sending.delivery_send(Delivery.objects.get(event=second).pk) is None
    assert _dispatch() == []
    record(world)
    assert Delivery.objects.filter(endpoint=endpoint).count() == 2
    assert len(receiver.received) == 1
    assert Event.objects.filter(type="webhook.failed", data__endpoint=str(endpoint.pk)).count() == 1


def test_it_honours_retry_after_on_429_and_503(world, receiver, frozen_clock):
    make_endpoint(world, receiver.url())
    receiver.respond(Scripted(429, headers={"Retry-After": "120"}), Scripted(503, headers={"Retry-After": "7"}))
    delivery = Delivery.objects.get(event=record(world))
    sending.delivery_send(delivery.pk)
    delivery.refresh_from_db()
    assert delivery.next_attempt_at == frozen_clock.now() + timedelta(seconds=120)
    frozen_clock.advance(119)
    assert _dispatch() == []  # the schedule alone would have retried after 5 s
    frozen_clock.advance(1)
    _dispatch()
    delivery.refresh_from_db()
    assert delivery.last_status == 503
    assert delivery.next_attempt_at == frozen_clock.now() + timedelta(seconds=7)


def test_it_counts_a_redirect_as_a_failure_and_does_not_follow_it(world, receiver, frozen_clock):
    from webhooks.tests.conftest import Receiver

    target = Receiver()
    try:
        make_endpoint(world, receiver.url())
        receiver.respond(Scripted(302, headers={"Location": target.url("/stolen")}))
        delivery = Delivery.objects.get(event=record(world))
        sending.delivery_send(delivery.pk)
        delivery.refresh_from_db()
        assert delivery.state == Delivery.State.PENDING
        assert delivery.last_status == 302
        assert "redirect" in delivery.last_error
        assert target.received == []
    finally:
        target.close()


@override_settings(WEBHOOK_TIMEOUT=1)
def test_it_records_a_timeout_as_a_failed_attempt(world, receiver, frozen_clock):
    make_endpoint(world, receiver.url())
    receiver.respond(Scripted(200, delay=3))
    delivery = Delivery.objects.get(event=record(world))
    sending.delivery_send(delivery.pk)
    attempt = Attempt.objects.get(delivery=delivery)
    assert not attempt.succeeded
    assert "timed out" in attempt.error
    assert attempt.duration_ms < 2500


def test_it_gives_up_after_the_schedule_and_records_webhook_failed_once(world, receiver, frozen_clock):
    endpoint, _ = make_endpoint(world, receiver.url())
    # A second endpoint listens for webhook.* events; its own failures must not loop.
    watcher, _ = make_endpoint(world, receiver.url("/watch"), event_types=["webhook.*"])
    receiver.respond(*[Scripted(500)] * 10)
    event = record(world)
    delivery = Delivery.objects.get(event=event, endpoint=endpoint)
    sending.delivery_send(delivery.pk)
    for _ in range(len(sending.RETRY_SCHEDULE)):
        delivery.refresh_from_db()
        frozen_clock.advance((delivery.next_attempt_at - frozen_clock.now()).total_seconds())
        for delivery_id, claim in sending.deliveries_claim_due():
            if delivery_id == str(delivery.pk):
                sending.delivery_send(delivery_id, claim)
    delivery.refresh_from_db()
    assert delivery.state == Delivery.State.DEAD
    assert delivery.attempts == sending.MAX_ATTEMPTS == 10
    assert Attempt.objects.filter(delivery=delivery).count() == 10
    endpoint.refresh_from_db()
    assert endpoint.enabled  # ~3.2 days of retries: short of the 5-day disabling rule
    failed = Event.objects.get(type="webhook.failed")
    assert failed.data["delivery"] == str(delivery.pk)
    assert failed.data["event"] == event.public_id
    assert "secret" not in str(failed.data) and endpoint.url not in str(failed.data)
    # The watcher owes exactly the webhook.failed event; failing it records nothing more.
    watch_delivery = Delivery.objects.get(endpoint=watcher, event=failed)
    receiver.respond(Scripted(410))
    sending.delivery_send(watch_delivery.pk)
    assert Event.objects.filter(type__startswith="webhook.").count() == 1
    assert not Delivery.objects.filter(event__type__startswith="webhook.").exclude(pk=watch_delivery.pk).exists()


@override_settings(WEBHOOK_DISABLE_AFTER=5 * 24 * 3600)
def test_it_disables_an_endpoint_only_after_five_days_of_continuous_failure(world, receiver, frozen_clock):
    endpoint, _ = make_endpoint(world, receiver.url())
    receiver.respond(*[Scripted(500)] * 20)
    for _day in range(5):
        sending.delivery_send(Delivery.objects.get(event=record(world)).pk)
        endpoint.refresh_from_db()
        assert endpoint.enabled
        frozen_clock.advance(24 * 3600)
    sending.delivery_send(Delivery.objects.get(event=record(world)).pk)
    endpoint.refresh_from_db()
    assert not endpoint.enabled
    assert "5 days" in endpoint.disabled_reason


@pytest.mark.django_db(transaction=True)
@override_settings(WEBHOOK_DISABLE_AFTER=3600)
def test_it_mails_the_owners_and_admins_when_it_disables_an_endpoint(world, receiver, frozen_clock, mailoutbox):
    from tenants.models import Membership
    from tenants.tests.factories import MembershipFactory

    admin = MembershipFactory(tenant=world.tenant, role=Membership.Role.ADMIN).user
    endpoint, _ = make_endpoint(world, receiver.url("/secret-token-path?token=abc"))
    receiver.respond(*[Scripted(500)] * 5)
    sending.delivery_send(Delivery.objects.get(event=record(world)).pk)
    frozen_clock.advance(3601)
    sending.delivery_send(Delivery.objects.get(event=record(world)).pk)
    assert not Endpoint.objects.get(pk=endpoint.pk).enabled
    assert len(mailoutbox) == 1
    message = mailoutbox[0]
    assert sorted(message.to) == sorted([world.owner.email, admin.email])
    assert world.member.email not in message.to
    assert str(endpoint.pk) in message.body
    assert "token=abc" not in message.body


def test_it_does_not_fan_out_to_disabled_or_non_matching_endpoints(world, receiver):
    catch_all, _ = make_endpoint(world, receiver.url("/all"))
    exact, _ = make_endpoint(world, receiver.url("/exact"), event_types=["ingest.received"])
    prefix, _ = make_endpoint(world, receiver.url("/prefix"), event_types=["message.*"])
    by_mailbox, _ = make_endpoint(world, receiver.url("/mailbox"), mailbox_ids=[world.sibling.pk])
    by_domain, _ = make_endpoint(world, receiver.url("/domain"), domain_ids=[world.domain.pk])
    disabled, _ = make_endpoint(world, receiver.url("/off"))
    Endpoint.objects.filter(pk=disabled.pk).update(enabled=False)

    def owed(event: Event) -> set:
        return set(Delivery.objects.filter(event=event).values_list("endpoint_id", flat=True))

    assert owed(record(world, "ingest.received")) == {catch_all.pk, exact.pk, by_domain.pk}
    assert owed(record(world, "message.quarantined")) == {catch_all.pk, prefix.pk, by_domain.pk}
    assert owed(record(world, "message.deleted", mailbox=world.sibling)) == {
        catch_all.pk,
        prefix.pk,
        by_mailbox.pk,
        by_domain.pk,
    }
    # Another tenant's events never reach tenant A's endpoints.
    assert owed(record(world, "ingest.received", mailbox=world.outsider_mailbox)) == set()


def test_it_creates_deliveries_atomically_with_the_event(world, receiver):
    from django.db import transaction

    make_endpoint(world, receiver.url())

    def record_then_fail() -> None:
        with transaction.atomic():
            record(world)
            assert Delivery.objects.count() == 1
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        record_then_fail()
    assert Delivery.objects.count() == 0
    assert Event.objects.filter(type="ingest.received").count() == 0


def test_a_task_takes_other_due_deliveries_along_and_a_later_task_finds_its_own_gone(world, receiver, frozen_clock):
    """Under load a stream of one-delivery tasks becomes batches: the first task sends what is
    due, oldest first; the task queued for a delivery it took ends without a request."""
    from webhooks.tasks import deliveries_send

    make_endpoint(world, receiver.url())
    events = []
    for number in range(5):
        events.append(record(world, queue_id=f"Q{number}"))
        frozen_clock.advance(1)
    ids = [str(Delivery.objects.get(event=event).pk) for event in events]
    later = record(world, queue_id="not yet due")
    Delivery.objects.filter(event=later).update(next_attempt_at=frozen_clock.now() + timedelta(minutes=5))

    deliveries_send.apply(args=[[ids[-1]]])  # the task of the newest delivery runs first
    requests = receiver.wait_for(5)
    assert sorted(request.headers["webhook-id"] for request in requests) == sorted(e.public_id for e in events)
    assert set(Delivery.objects.filter(pk__in=ids).values_list("state", flat=True)) == {Delivery.State.DELIVERED}
    assert Delivery.objects.get(event=later).state == Delivery.State.PENDING  # not due: left alone

    deliveries_send.apply(args=[[ids[0]]])  # the first one's own task, now late
    time.sleep(0.3)
    assert len(receiver.received) == 5  # nothing more was sent
    assert Attempt.objects.count() == 5


def test_a_delivery_waiting_in_the_broker_past_its_lease_is_not_counted_as_an_attempt(world, receiver, frozen_clock):
    """A backlog in the broker outlasts the dispatcher's lease: the delivery is handed out
    again under the same claim with no attempt counted, the waiting task still sends it
    (once), and the later copy of the task finds it taken."""
    make_endpoint(world, receiver.url())
    event = record(world)
    (delivery,) = Delivery.objects.filter(event=event)
    (queued,) = sending.deliveries_claim_due_batches(500, 50)  # its task now waits in the broker
    frozen_clock.advance(settings.WEBHOOK_LEASE + 1)
    assert sending.deliveries_claim_due_batches(500, 50) == [queued]  # handed out again, same claim
    delivery.refresh_from_db()
    assert delivery.state == Delivery.State.SENDING and delivery.attempts == 0

    assert sending.deliveries_send(*queued)[0].state == Delivery.State.DELIVERED  # the first copy starts
    assert sending.deliveries_send(*queued) == []  # the second copy: taken
    time.sleep(0.2)
    assert len(receiver.received) == 1
    delivery.refresh_from_db()
    assert delivery.attempts == 1
    assert list(Attempt.objects.filter(delivery=delivery).values_list("number", flat=True)) == [1]


def test_a_long_backlog_neither_abandons_a_queued_delivery_nor_hands_it_out_every_lease(world, receiver, frozen_clock):
    make_endpoint(world, receiver.url())
    event = record(world)
    handed_out = len(sending.deliveries_claim_due_batches(500, 50))
    for _ in range(3600 // 15):  # an hour of dispatcher rounds while the task waits
        frozen_clock.advance(15)
        handed_out += len(sending.deliveries_claim_due_batches(500, 50))
    delivery = Delivery.objects.get(event=event)
    assert delivery.attempts == 0 and delivery.state == Delivery.State.SENDING
    assert 2 <= handed_out <= 10  # a lost broker message is recovered, a backlog not flooded
    # The task that waited all along starts it at last.
    assert sending.deliveries_send([str(delivery.pk)], delivery.claim)[0].state == Delivery.State.DELIVERED
    assert len(receiver.wait_for(1)) == 1


def test_a_started_delivery_whose_worker_died_is_claimed_again_with_its_attempt_counted(world, receiver, frozen_clock):
    make_endpoint(world, receiver.url())
    event = record(world)
    ((ids, claim),) = sending.deliveries_claim_due_batches(500, 50)
    assert sending.deliveries_start(ids, claim)  # the worker starts it, then dies mid-request
    frozen_clock.advance(settings.WEBHOOK_LEASE + 1)
    ((ids_again, claim_again),) = sending.deliveries_claim_due_batches(500, 50)
    assert claim_again != claim
    assert sending.deliveries_send(ids, claim) == []  # the dead worker's queued claim is gone
    assert sending.deliveries_send(ids_again, claim_again)[0].state == Delivery.State.DELIVERED
    delivery = Delivery.objects.get(event=event)
    assert delivery.attempts == 2  # the lost attempt counts
    assert list(Attempt.objects.filter(delivery=delivery).values_list("number", flat=True)) == [2]


def test_a_started_delivery_is_not_handed_out_again_while_its_task_may_still_run(world, receiver, frozen_clock):
    """The lease outlasts the send task's hard time limit: a slow attempt (a receiver taking
    its time, then recording) is never sent twice at once; once the task must be dead, the
    delivery is taken back."""
    from webhooks.tasks import deliveries_send

    assert deliveries_send.time_limit == settings.WEBHOOK_TASK_TIME_LIMIT
    assert deliveries_send.soft_time_limit == settings.WEBHOOK_TASK_SOFT_TIME_LIMIT
    assert settings.WEBHOOK_LEASE > settings.WEBHOOK_TASK_TIME_LIMIT > settings.WEBHOOK_TASK_SOFT_TIME_LIMIT
    make_endpoint(world, receiver.url())
    record(world)
    ((ids, claim),) = sending.deliveries_claim_due_batches(500, 50)
    assert sending.deliveries_start(ids, claim)  # the task starts its attempt
    frozen_clock.advance(settings.WEBHOOK_TASK_TIME_LIMIT)  # up to here the task may still be sending
    assert sending.deliveries_claim_due_batches(500, 50) == []
    frozen_clock.advance(settings.WEBHOOK_LEASE - settings.WEBHOOK_TASK_TIME_LIMIT + 1)
    ((ids_again, _),) = sending.deliveries_claim_due_batches(500, 50)  # killed by now: taken back
    assert ids_again == ids


def test_a_lease_no_longer_than_the_send_tasks_hard_limit_stops_the_start():
    import os
    import subprocess
    import sys

    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "mailplatform.settings"}
    check = "import django; django.setup(); from django.conf import settings; print(settings.WEBHOOK_LEASE)"
    refused = subprocess.run(
        [sys.executable, "-c", check], env={**env, "WEBHOOK_LEASE": "60"}, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0
    assert f"WEBHOOK_LEASE: must be at least {settings.WEBHOOK_TASK_TIME_LIMIT + 1}, got 60" in refused.stderr
    default = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=60)
    assert int(default.stdout.strip().splitlines()[-1]) > settings.WEBHOOK_TASK_TIME_LIMIT, default.stderr
