"""Per-mailbox message UIDs for IMAP and POP3 (RFC 3501 section 2.3.1.1, RFC 1939 UIDL).

Every creator of Message rows takes their UIDs here, inside its own transaction: the
``UPDATE ... RETURNING`` locks the mailbox row until that transaction commits, so two
drainers filling the same mailbox are serialized and a UID a client has seen is always
lower than every UID that becomes visible after it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from uuid import UUID

from django.db import connection, transaction

from mailboxes.models import Mailbox, Message


def mailbox_uids_take(mailbox_id: UUID, count: int) -> range:
    """Reserve ``count`` consecutive UIDs of one mailbox; must run inside a transaction."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("mailbox_uids_take must run inside the transaction that creates the messages")
    table = Mailbox._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET uid_next = uid_next + %s WHERE id = %s RETURNING uid_next",  # noqa: S608
            # The column's own conversion: SQLite stores UUIDs as 32 hex digits, and its driver
            # binds no UUID objects.
            [count, Mailbox._meta.pk.get_db_prep_value(mailbox_id, connection)],
        )
        row = cursor.fetchone()
    if row is None:
        raise Mailbox.DoesNotExist(mailbox_id)
    end = int(row[0])
    return range(end - count, end)


def messages_uids_assign(messages: Iterable[Message]) -> None:
    """Give each unsaved message the next UIDs of its mailbox, in the given order.

    Mailboxes are locked in id order, so two batches sharing mailboxes cannot deadlock.
    """
    pending = [(message.mailbox_id, message) for message in messages if message.uid is None]
    counts: Counter[UUID] = Counter(mailbox_id for mailbox_id, _ in pending if mailbox_id is not None)
    taken = {mailbox_id: iter(mailbox_uids_take(mailbox_id, counts[mailbox_id])) for mailbox_id in sorted(counts)}
    for mailbox_id, message in pending:
        if mailbox_id is not None:
            message.uid = next(taken[mailbox_id])
