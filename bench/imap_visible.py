"""What showing only settled messages costs the IMAP and POP3 reads (mailaccess.store.visible).

    .venv/bin/python bench/imap_visible.py [--messages 20000] [--rounds 15]

Builds a scratch PostgreSQL database with one mailbox of ``--messages`` indexed messages (and
another 50,000 in other mailboxes, some still ``stored``, so the partial index has neighbours),
then times, in this process and interleaved round by round so the machine's load falls on
both alike, each read a session makes, with the floor (the lowest UID still awaiting its
parse, one subquery) and without it (the query as before): SELECT's and IDLE's
``folder_summary``, ``folder_uids``, the light ``rows`` of a UID FETCH 1:* (FLAGS RFC822.SIZE),
``search_rows`` and ``mailbox_uid_state``. Prints the median of each in milliseconds, then
the same with one message of the mailbox stored (not parsed) halfway, and the plan of the
floor's subquery. The scratch database is removed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.waiters import scratch_database, scratch_database_drop  # noqa: E402


def prepare(messages: int) -> tuple[Any, Any]:
    from django.core.management import call_command
    from django.utils import timezone

    from mailaccess.auth import Access
    from mailboxes.models import Mailbox, Message
    from tenants.access import Principal
    from tenants.models import Domain, Tenant

    call_command("migrate", verbosity=0)
    tenant = Tenant.objects.create(name="Visible bench", slug="visible-bench")
    domain = Domain.objects.create(tenant=tenant, name="visible.example.test", state=Domain.State.VERIFIED)
    boxes = [
        Mailbox.objects.create(
            tenant=tenant, domain=domain, local_part=f"box{n}", address=f"box{n}@visible.example.test"
        )
        for n in range(11)
    ]
    now = timezone.now()
    verdict = {"header": "x", "presented": {"field": "Authentication-Results: x\r\n", "removed": [], "delta": 27}}
    for number, box in enumerate(boxes):
        count = messages if number == 0 else 5000
        rows = [
            Message(
                tenant=tenant, mailbox=box, uid=uid, rcpt=box.address, size=4000, sha256="0" * 64,
                storage_key=f"raw/{uid}", trace_id=f"b{number}-{uid}", received_at=now,
                state=Message.State.STORED if number and uid % 50 == 0 else Message.State.INDEXED,
                is_read=uid % 3 == 0, authentication=verdict,
            )
            for uid in range(1, count + 1)
        ]  # fmt: skip
        Message.objects.bulk_create(rows, batch_size=5000)
        Mailbox.objects.filter(pk=box.pk).update(uid_next=count + 1)
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE mailboxes_message")
    access = Access(
        principal=Principal.system(tenant), login=boxes[0].address, mailboxes={"INBOX": boxes[0].pk}, can_write=True
    )
    return access, boxes[0]


def measure(access: Any, mailbox: Any, rounds: int) -> dict[str, tuple[float, float]]:
    from django.db.models import BigIntegerField, Value

    from mailaccess import store

    floor = store.unsettled_floor
    reads: dict[str, Callable[[], Any]] = {
        "folder_summary": lambda: store.folder_summary(access, mailbox.pk),
        "folder_uids": lambda: store.folder_uids(access, mailbox.pk),
        "rows light, every UID": lambda: store.rows(access, mailbox.pk, uids, light=True),
        "search_rows": lambda: store.search_rows(access, mailbox.pk),
        "mailbox_uid_state": lambda: store.mailbox_uid_state(mailbox.pk),
    }
    uids = store.folder_uids(access, mailbox.pk)
    samples: dict[str, dict[bool, list[float]]] = {name: {True: [], False: []} for name in reads}
    for _round in range(rounds):
        for with_floor in (True, False):
            store.unsettled_floor = (  # type: ignore[assignment]
                floor if with_floor else lambda _mailbox: Value(store.NO_UID, output_field=BigIntegerField())
            )
            try:
                for name, read in reads.items():
                    started = time.perf_counter()
                    read()
                    samples[name][with_floor].append((time.perf_counter() - started) * 1000)
            finally:
                store.unsettled_floor = floor
    return {name: (statistics.median(s[True]), statistics.median(s[False])) for name, s in samples.items()}


def show(title: str, figures: dict[str, tuple[float, float]]) -> None:
    print(f"\n{title}\n| read | with the floor | without |\n|---|---|---|")
    for name, (with_floor, without) in figures.items():
        print(f"| {name} | {with_floor:.2f} ms | {without:.2f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--database", default="mp_visible_bench")
    options = parser.parse_args()
    scratch_database(options.database)
    import os

    import django

    try:
        django.setup()
        access, mailbox = prepare(options.messages)
        print(f"{options.messages} messages in the mailbox, load average {os.getloadavg()}")
        show("Nothing awaiting its parse", measure(access, mailbox, options.rounds))
        from mailboxes.models import Message

        Message.objects.filter(mailbox=mailbox, uid=options.messages // 2).update(state=Message.State.STORED)
        show("One message halfway still stored", measure(access, mailbox, options.rounds))
        from django.db import connection

        from mailaccess import store

        sql, params = (
            Message.objects.filter(uid__lt=store.unsettled_floor(mailbox.pk)).values("uid")[:1].query.sql_with_params()
        )
        with connection.cursor() as cursor:
            cursor.execute("EXPLAIN " + sql, params)
            print("\nplan of the floor:\n" + "\n".join(row[0] for row in cursor.fetchall()))
        print(f"load average {os.getloadavg()}")
    finally:
        scratch_database_drop(options.database)


if __name__ == "__main__":
    main()
