"""What the broker holds: the number of task messages waiting in a queue.

The sweepers decide from the database what is pending, but a message whose task is merely
waiting in the broker behind a backlog is not lost, and enqueuing it again doubles the
backlog (after a worker restart, 5,934 parse tasks were once queued for 4,503 messages).
:func:`queue_waiting` lets a sweeper tell "lost" from "queued": while a queue still holds
messages, what is missing from it cannot be told apart from what is waiting in it.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def queue_waiting(name: str) -> int | None:
    """Task messages ready in queue ``name`` (not yet handed to a worker); None when the
    broker cannot say (unreachable, or a transport that does not count)."""
    from mailplatform.celery import app

    try:
        queue = app.amqp.queues[name]
        with app.connection_for_read() as connection:
            # The queue's own declaration (durable, exchange, routing key), so RabbitMQ sees
            # the same arguments Celery declared it with; Redis and the filesystem transport
            # answer with the length of the list or folder.
            declared = queue.bind(connection.default_channel).queue_declare()
    except Exception as exc:  # the broker away: the caller falls back to the database alone
        logger.warning("cannot count queue %s: %s", name, type(exc).__name__)
        return None
    return int(declared.message_count) if declared is not None else None


def queue_purge(name: str) -> int:
    """Drop every message waiting in queue ``name`` (tests and operators' recovery)."""
    from mailplatform.celery import app

    queue = app.amqp.queues[name]
    with app.connection_for_write() as connection:
        return int(queue.bind(connection.default_channel).purge() or 0)
