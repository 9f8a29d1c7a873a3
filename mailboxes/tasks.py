"""Celery tasks of the mail path after the spool: parse, index, and their sweepers.

Thin and idempotent: each takes ids and calls one service. Transient errors (blob storage
or database unreachable) retry with backoff; a message that cannot be parsed is
quarantined by the service, never retried forever. Periodic tasks are registered in
mailplatform/celery.py.
"""

from __future__ import annotations

import logging

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.db import DataError

from mailboxes import pipeline, retention

logger = logging.getLogger(__name__)


@shared_task(
    name="mailboxes.tasks.message_parse",
    acks_late=True,
    ignore_result=True,
    bind=True,
    max_retries=8,
    soft_time_limit=60,
    time_limit=90,
)
def message_parse(self, message_id: str) -> None:  # type: ignore[no-untyped-def]
    """Parse one stored message (DESIGN section 3 step 3) and index it (step 4) in one transaction.

    One row version and one commit per message, no broker round trip, waiters woken sooner.
    Should the search document be refused, the parse is kept and the ``index`` queue takes
    over (and the stuck sweeper after that).
    """
    try:
        try:
            outcome = pipeline.message_parse(message_id=message_id, index=True)
        except DataError as exc:
            # The search document was refused (PostgreSQL limits a tsvector's size): keep the
            # parse, and let the index queue (then the stuck sweeper) deal with the document.
            logger.warning("inline index of %s refused, parsing alone: %s", message_id, type(exc).__name__)
            outcome = pipeline.message_parse(message_id=message_id)
    except SoftTimeLimitExceeded:
        pipeline.message_quarantine(message_id=message_id, reason="parsing exceeded its time limit")
        return
    except Exception as exc:
        logger.warning("parse of %s failed, will retry: %s", message_id, type(exc).__name__)
        raise self.retry(exc=exc, countdown=min(300, 2 ** (self.request.retries + 1))) from None
    if outcome == "parsed":
        message_index.delay(message_id)


@shared_task(
    name="mailboxes.tasks.messages_parse",
    acks_late=True,
    ignore_result=True,
    bind=True,
    max_retries=8,
    soft_time_limit=120,
    time_limit=180,
)
def messages_parse(self, message_ids: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Parse and index a batch of stored messages (one drained spool batch) in one transaction.

    One broker message and one commit for the batch instead of one each per message. A message
    that fails transiently, or every message of a batch that hit its time limit, goes on in a
    ``message_parse`` task of its own (where a message too slow to parse is quarantined); the
    database still says what is pending, so a broker outage here is the stuck sweeper's.
    """
    try:
        result = pipeline.messages_parse(message_ids=message_ids)
    except SoftTimeLimitExceeded:
        logger.warning("parse batch of %d exceeded its time limit, each message on its own", len(message_ids))
        alone = [str(value) for value in message_ids]
        outcomes: dict[str, str] = {}
    except Exception as exc:  # nothing written (loading the batch failed: the database is away)
        logger.warning("parse batch of %d failed, will retry: %s", len(message_ids), type(exc).__name__)
        raise self.retry(exc=exc, countdown=min(300, 2 ** (self.request.retries + 1))) from None
    else:
        alone, outcomes = result.retry, result.outcomes
    try:
        for message_id in alone:
            message_parse.apply_async((message_id,), countdown=2)
        for message_id, outcome in outcomes.items():
            if outcome == "parsed":
                message_index.delay(message_id)
    except Exception as exc:  # the broker is away: what is still stored or parsed is swept later
        logger.warning("parse batch: follow-up tasks not sent: %s", type(exc).__name__)


@shared_task(
    name="mailboxes.tasks.message_index",
    acks_late=True,
    ignore_result=True,
    bind=True,
    max_retries=8,
    soft_time_limit=30,
    time_limit=60,
)
def message_index(self, message_id: str) -> None:  # type: ignore[no-untyped-def]
    """Index one parsed message (DESIGN section 3 step 4)."""
    try:
        pipeline.message_index(message_id=message_id)
    except Exception as exc:
        logger.warning("index of %s failed, will retry: %s", message_id, type(exc).__name__)
        raise self.retry(exc=exc, countdown=min(300, 2 ** (self.request.retries + 1))) from None


@shared_task(name="mailboxes.tasks.messages_stuck_sweep", ignore_result=True, soft_time_limit=120, time_limit=180)
def messages_stuck_sweep() -> None:
    """Re-enqueue messages sitting in ``stored`` or ``parsed`` too long (the database decides),
    and let IMAP and POP3 show those stuck unparsed for long (mailboxes.presentation)."""
    from mailboxes.presentation import messages_unverified_settle

    retention.messages_stuck_requeue()
    messages_unverified_settle()


@shared_task(name="mailboxes.tasks.messages_retention_sweep", ignore_result=True, soft_time_limit=600, time_limit=900)
def messages_retention_sweep() -> None:
    """Apply retention, expire temporary mailboxes, and purge blobs of deleted messages."""
    retention.mailboxes_expire()
    retention.messages_retention_apply()
    retention.messages_purge()


@shared_task(name="mailboxes.tasks.messages_reverify_sweep", ignore_result=True, soft_time_limit=240, time_limit=300)
def messages_reverify_sweep() -> None:
    """Verify again the trust verdicts that had a temperror (the DNS did not answer then)."""
    from mailboxes.authentication import messages_reverify_due

    messages_reverify_due()


@shared_task(name="mailboxes.tasks.messages_rescan_sweep", ignore_result=True, soft_time_limit=240, time_limit=300)
def messages_rescan_sweep() -> None:
    """Scan again the messages whose antivirus scan failed while clamd was away."""
    from mailboxes.antivirus import messages_rescan_due

    messages_rescan_due()
