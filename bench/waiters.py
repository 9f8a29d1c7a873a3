"""Concurrent long-poll waiters on one web process: memory, and how fast they are answered.

    .venv/bin/python bench/waiters.py [--waiters 1000] [--mailboxes 10] [--database mp_parse2_wait]

Builds a scratch PostgreSQL database (migrated; one tenant, ``--mailboxes`` mailboxes and a
tenant-wide API key), starts one ``uvicorn mailplatform.asgi:application`` process (one
event loop, the default ``WAITING_DB_THREADS``), and opens ``--waiters`` HTTP connections,
each a ``GET /api/v1/messages/wait/?mailbox=<one of them>&after=<now>&timeout=120``
(plain asyncio sockets, so the client costs little). Once every waiter is in, it prints the
web process's RSS, then stores, parses and indexes one message per mailbox in this process
(the real pipeline; the index transaction's NOTIFY wakes the waiters) and prints how long
after its mailbox's index commit each waiter got its 200, and the RSS again. The database is
dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


ADMIN_URL = "postgres://postgres@127.0.0.1:5432/postgres"


def scratch_database(name: str) -> None:
    """Point this process at a new, empty PostgreSQL database ``name`` (local blobs, no S3)."""
    import psycopg

    with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    os.environ.update(
        DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{name}",
        DATA_DIR=str(ROOT / "var" / f"bench-{name}"),
        LOG_LEVEL="WARNING",
        DJANGO_SETTINGS_MODULE="mailplatform.settings",
    )
    for variable in ("S3_BUCKET", "S3_ENDPOINT_URL"):
        os.environ.pop(variable, None)


def scratch_database_drop(name: str) -> None:
    import psycopg
    from django.db import connections

    connections.close_all()
    with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def until_idle(pid: int) -> float:
    """Seconds until the process's CPU time stops growing (every waiter authenticated and in)."""
    previous, began = -1.0, time.monotonic()
    while True:
        await asyncio.sleep(1.0)
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if cpu - previous < 0.05 and time.monotonic() - began > 3:
            return time.monotonic() - began
        previous = cpu


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def waiter(port: int, path: str, key: str, answered: dict[int, float], number: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    status_line = await reader.readline()
    answered[number] = time.monotonic()
    await reader.read()
    writer.close()
    return int(status_line.split()[1])


async def run(options: argparse.Namespace) -> None:
    scratch_database(options.database)
    import django

    django.setup()
    from asgiref.sync import sync_to_async
    from django.core.management import call_command

    from mailboxes import pipeline
    from mailboxes.models import Mailbox
    from mailboxes.tests.helpers import message_store, simple_message
    from mailplatform.testing import ChildProcess, env_with, free_port, wait_for_port
    from tenants.access import ALL_PERMISSIONS, Principal
    from tenants.models import Domain, Tenant
    from tenants.services import api_key_mint

    def prepare() -> tuple[list[Mailbox], str]:
        call_command("migrate", verbosity=0)
        tenant = Tenant.objects.create(name="Waiters", slug="waiters")
        domain = Domain.objects.create(tenant=tenant, name="waiters.example.test", state=Domain.State.VERIFIED)
        mailboxes = [
            Mailbox.objects.create(tenant=tenant, domain=domain, local_part=f"box{n}", address=f"box{n}@{domain.name}")
            for n in range(options.mailboxes)
        ]
        _, key = api_key_mint(
            principal=Principal.system(tenant), name="bench", permissions=ALL_PERMISSIONS, domains=(), mailboxes=()
        )
        return mailboxes, key

    def deliver(mailbox: Mailbox) -> float:
        message = message_store(mailbox, simple_message(f"Your code for {mailbox.local_part}", "Code: 424242"))
        pipeline.message_parse(message_id=message.pk)
        pipeline.message_index(message_id=message.pk)
        return time.monotonic()  # the index transaction has committed

    mailboxes, key = await sync_to_async(prepare)()
    port = free_port()
    web = ChildProcess(
        [sys.executable, "-m", "uvicorn", "mailplatform.asgi:application", "--port", str(port), "--lifespan", "off"],
        env=env_with(ALLOWED_HOSTS="127.0.0.1,localhost"),
        cwd=ROOT,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        pid = web.process.pid
        await asyncio.sleep(1)
        idle = rss_mib(pid)
        since = datetime.fromtimestamp(time.time() - 1, tz=UTC).isoformat().replace("+00:00", "Z")
        answered: dict[int, float] = {}
        tasks = [
            asyncio.create_task(
                waiter(
                    port,
                    f"/api/v1/messages/wait/?mailbox={mailboxes[n % len(mailboxes)].pk}&after={since}&timeout=120",
                    key,
                    answered,
                    n,
                )
            )
            for n in range(options.waiters)
        ]
        ramp = await until_idle(pid)
        assert not answered, f"{len(answered)} answered before any mail"
        waiting = rss_mib(pid)
        threads = threads_of(pid)
        indexed: list[float] = []
        for mailbox in mailboxes:
            indexed.append(await sync_to_async(deliver)(mailbox))
        statuses = await asyncio.gather(*tasks)
        delays = [(answered[n] - indexed[n % len(mailboxes)]) * 1000 for n in range(options.waiters)]
        after = rss_mib(pid)
        print(f"uvicorn, one process; {options.waiters} waiters on {len(mailboxes)} mailboxes, one tenant")
        print(f"all waiters in after {ramp:.1f} s (authenticated and listening; CPU idle)")
        print(f"RSS: idle {idle:.0f} MiB, {options.waiters} waiting {waiting:.0f} MiB, after answering {after:.0f} MiB")
        print(f"threads in the web process while waiting: {threads}")
        print(f"statuses: {sorted(set(statuses))}, 200s: {statuses.count(200)}")
        print(
            f"answered after its mailbox's index commit: p50 {percentile(delays, 0.5):.0f} ms, "
            f"p95 {percentile(delays, 0.95):.0f} ms, max {max(delays):.0f} ms"
        )
        print(f"load average {os.getloadavg()}")
    finally:
        web.stop()
        await sync_to_async(scratch_database_drop)(options.database)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waiters", type=int, default=1000)
    parser.add_argument("--mailboxes", type=int, default=10)
    parser.add_argument("--database", default="mp_parse2_wait")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
