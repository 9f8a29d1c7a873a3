"""Celery tasks of the mail path after the spool: parse (and, later, index)."""

from __future__ import annotations

import logging

from celery import shared_task

logger = logging.getLogger(__name__)


@shared_task(name="mailboxes.tasks.message_parse", acks_late=True, ignore_result=True)
def message_parse(message_id: str) -> None:
    """Parse one stored message (DESIGN section 3 step 3).

    A no-op until parsing is implemented: the message stays ``stored``, and the sweeper
    (the database is the source of truth) will re-enqueue it once this does the work.
    """
    logger.debug("message_parse %s: parsing not implemented yet", message_id)
