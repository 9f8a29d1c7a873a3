"""Parse + index throughput of one worker process (msgs/s), for 10 KiB and 100 KiB messages.

    .venv/bin/python bench/parse_index.py [--messages 300] [--sizes 10240,102400] [--database mp_parse2_parse]

Builds a scratch PostgreSQL database (migrated; one tenant and mailbox), writes the messages
the way the drainer leaves them (raw object in the local blob folder, a ``stored`` row;
not timed), then runs exactly what a worker process runs for each one, in one process and
one thread, as the ``parse`` task does: ``pipeline.message_parse(index=True)`` (read the raw
object, mail-parser, sanitize the HTML, extract codes and links, thread, store each
attachment as its own object, then one transaction: the parsed row with its weighted
tsvector, the ``indexer.indexed`` event and NOTIFY). Celery's own dispatch overhead
is left out, so the figure is the work itself.

Each message is multipart/mixed: a text part and an HTML part (multipart/alternative) with a
code and links, and a PDF-like attachment filling the rest of the size (base64). Prints
msgs/s by wall clock and by this process's CPU time (user+sys; "per core" on a machine
shared with other work), plus PostgreSQL's share is not in the CPU figure: it runs on the
same 2 cores.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def message_bytes(size: int, number: int) -> bytes:
    text = (
        f"Hello,\r\n\r\nYour verification code is {100000 + number}.\r\n"
        "Confirm at https://shop.example/confirm?token=abc and read https://shop.example/terms\r\n\r\n"
        "Thanks,\r\nThe Shop\r\n"
    )
    html = (
        "<html><body><p>Hello,</p><p>Your verification code is <b>"
        f"{100000 + number}</b>.</p><p><a href='https://shop.example/confirm?token=abc'>Confirm</a></p>"
        "<script>alert(1)</script><img src='https://tracker.example/p.gif'></body></html>"
    )
    head = (
        f"From: The Shop <no-reply@shop.example>\r\nTo: box@bench.example.test\r\n"
        f"Subject: Invoice {number} and your code\r\nMessage-ID: <{uuid.uuid4().hex}@shop.example>\r\n"
        "Date: Tue, 01 Jul 2025 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
        '--outer\r\nContent-Type: multipart/alternative; boundary="inner"\r\n\r\n'
        f"--inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
        f"--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--inner--\r\n"
        '--outer\r\nContent-Type: application/pdf; name="invoice.pdf"\r\n'
        'Content-Disposition: attachment; filename="invoice.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
    ).encode()
    tail = b"\r\n--outer--\r\n"
    room = max(0, size - len(head) - len(tail))
    payload = os.urandom(room * 3 // 4 * 76 // 78)
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return head + encoded + tail


def _reference(raws: list[bytes]) -> float:
    """The same-run reference: ``mailparser.parse_from_bytes`` alone, msg/s per CPU-second (best of 3)."""
    import mailparser

    for raw in raws[:5]:
        mailparser.parse_from_bytes(raw)
    best = 0.0
    for _ in range(3):
        cpu_before = time.process_time()
        for raw in raws:
            mailparser.parse_from_bytes(raw)
        best = max(best, len(raws) / max(time.process_time() - cpu_before, 1e-9))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--sizes", default="10240,102400")
    parser.add_argument("--database", default="mp_parse2_parse")
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the timed loop to FILE")
    parser.add_argument(
        "--batch", type=int, default=1, help="messages per parse task (the drainer sends up to 32; 1: message_parse)"
    )
    options = parser.parse_args()

    import psycopg

    name = options.database
    admin = "postgres://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    data_dir = ROOT / "var" / f"bench-{name}"
    os.environ.update(
        DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{name}",
        DATA_DIR=str(data_dir),
        LOG_LEVEL="ERROR",
        DJANGO_SETTINGS_MODULE="mailplatform.settings",
    )
    os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/7")
    for variable in ("S3_BUCKET", "S3_ENDPOINT_URL"):
        os.environ.pop(variable, None)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connections

    from mailboxes import pipeline
    from mailboxes.models import Mailbox, Message
    from mailboxes.tests.helpers import message_store
    from tenants.models import Domain, Tenant

    try:
        call_command("migrate", verbosity=0)
        tenant = Tenant.objects.create(name="Parse", slug="parse")
        domain = Domain.objects.create(tenant=tenant, name="bench.example.test", state=Domain.State.VERIFIED)
        mailbox = Mailbox.objects.create(tenant=tenant, domain=domain, local_part="box", address="box@" + domain.name)
        print(
            f"one process, one thread; {options.messages} messages per size, {options.batch} per task;"
            f" load average {os.getloadavg()}"
        )
        for size in (int(value) for value in options.sizes.split(",")):
            raws = [message_bytes(size, n) for n in range(options.messages)]
            ids = [message_store(mailbox, raw).pk for raw in raws]
            reference = _reference(raws[5:])
            for warm in ids[:5]:  # imports, caches, connection
                pipeline.message_parse(message_id=warm, index=True)
            timed = ids[5:]
            profiler = cProfile.Profile(time.process_time) if options.profile else None
            cpu_before, wall_before = time.process_time(), time.perf_counter()
            if profiler:
                profiler.enable()
            if options.batch > 1:
                for start in range(0, len(timed), options.batch):
                    pipeline.messages_parse(message_ids=timed[start : start + options.batch])
            else:
                for message_id in timed:
                    pipeline.message_parse(message_id=message_id, index=True)
            if profiler:
                profiler.disable()
            wall = time.perf_counter() - wall_before
            cpu = time.process_time() - cpu_before
            if profiler:
                profiler.dump_stats(f"{options.profile}.{size // 1024}k")
            states = set(Message.objects.filter(pk__in=timed).values_list("state", flat=True))
            assert states == {Message.State.INDEXED}, states
            count = len(timed)
            print(
                f"{size // 1024:>4} KiB: {count / wall:6.1f} msg/s wall, {count / cpu:6.1f} msg/s per CPU-second"
                f" of the worker ({wall / count * 1000:.1f} ms wall, {cpu / count * 1000:.1f} ms CPU each);"
                f" reference, mail-parser alone on the same messages: {reference:6.1f} msg/s per CPU-second;"
                f" {100 * count / cpu / reference:.0f} % of it (target >= 50 %)"
            )
        print(f"load average {os.getloadavg()}")
    finally:
        import redis

        redis.Redis.from_url(os.environ["CELERY_BROKER_URL"]).delete("index")
        connections.close_all()
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
