"""Account bindings at scale: link-or-create latency, and the code proxy under 500 waiters.

    .venv/bin/python bench/bindings.py [--mailboxes 20000] [--bindings 100000] [--calls 500]
                                       [--waiters 500] [--database mp_bench_bindings]

Builds a scratch PostgreSQL database (migrated) with one tenant, one least-bound pool of
``--mailboxes`` mailboxes (10 accounts a mailbox, one per provider) and ``--bindings`` active
bindings spread evenly over them (bulk-created: mailboxes, pool members, bindings with hashed
links), ten providers with sender domains, and one tenant-wide API key. Starts one
``uvicorn mailplatform.asgi:application`` process and measures, over HTTP with keep-alive:

1. ``POST /api/v1/bindings/link-or-create`` for ``--calls`` existing accounts (the answer is
   the binding already there) and ``--calls`` new ones (allocation under the row lock, a new
   link, the event and audit entry), one after the other: p50 / p95 / max;
2. ``--waiters`` concurrent ``GET /api/v1/links/{link}/codes/latest/?wait=300`` on as many
   bindings of as many mailboxes (five accounts share each mailbox, so every answer goes
   through provider attribution), then one message with a code from each waiter's provider
   stored, parsed and indexed in this process: how long after the index commit each waiter got
   its code. The database is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.waiters import (  # noqa: E402
    percentile,
    rss_mib,
    scratch_database,
    scratch_database_drop,
    until_idle,
    waiter,
)

PROVIDERS = [f"p{n}" for n in range(10)]


def _line(label: str, samples: list[float], cpu: float | None = None) -> str:
    spent = f", server CPU {cpu * 1000 / len(samples):.1f} ms a call" if cpu is not None else ""
    return (
        f"{label}: p50 {percentile(samples, 0.5):.1f} ms, p95 {percentile(samples, 0.95):.1f} ms, "
        f"max {max(samples):.1f} ms ({len(samples)} calls{spent})"
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (the server's own work, whatever the load)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(options: argparse.Namespace) -> None:
    import httpx

    scratch_database(options.database)
    import django

    django.setup()
    from asgiref.sync import sync_to_async
    from django.core.management import call_command
    from django.db import connection as db_connection

    from mailboxes import pipeline
    from mailboxes.models import AccountBinding, AccountProvider, Mailbox, MailboxPool, PoolMailbox
    from mailboxes.tests.helpers import message_store, simple_message
    from mailplatform.testing import ChildProcess, env_with, free_port, wait_for_port
    from tenants import keys
    from tenants.access import ALL_PERMISSIONS, Principal
    from tenants.models import Domain, Tenant
    from tenants.services import api_key_mint

    per_mailbox = -(-options.bindings // options.mailboxes)
    assert per_mailbox <= len(PROVIDERS) // 2, "leave half the providers free for the new accounts"

    def prepare() -> tuple[str, str, list[tuple[str, str, str, Mailbox]]]:
        call_command("migrate", verbosity=0)
        began = time.monotonic()
        tenant = Tenant.objects.create(name="Bindings", slug="bindings")
        domain = Domain.objects.create(tenant=tenant, name="pool.example.test", state=Domain.State.VERIFIED)
        pool = MailboxPool.objects.create(tenant=tenant, domain=domain, name="bench", max_bindings_per_mailbox=10)
        for provider in PROVIDERS:
            AccountProvider.objects.create(tenant=tenant, name=provider, sender_domains=[f"{provider}.example"])
        mailboxes = Mailbox.objects.bulk_create(
            [
                Mailbox(tenant=tenant, domain=domain, local_part=f"m{n}", address=f"m{n}@{domain.name}")
                for n in range(options.mailboxes)
            ],
            batch_size=5000,
        )
        PoolMailbox.objects.bulk_create([PoolMailbox(pool=pool, mailbox=m) for m in mailboxes], batch_size=5000)
        links: list[tuple[str, str, str, Mailbox]] = []  # (link, account, provider, mailbox)
        rows = []
        for number in range(options.bindings):
            mailbox = mailboxes[number % options.mailboxes]
            provider = PROVIDERS[number // options.mailboxes]
            generated = keys.generate(prefix=keys.LINK_PREFIX)
            account = f"acct-{number}"
            rows.append(
                AccountBinding(
                    tenant=tenant,
                    pool=pool,
                    mailbox=mailbox,
                    account_ref=account,
                    provider=provider,
                    link_prefix=generated.prefix,
                    link_hash=generated.secret_hash,
                )
            )
            if len(links) < options.waiters and number < options.mailboxes:  # one waiter per mailbox
                links.append((generated.secret, account, provider, mailbox))
        AccountBinding.objects.bulk_create(rows, batch_size=5000)
        from django.db.models import Count, OuterRef, Subquery

        counts = (
            AccountBinding.objects.filter(mailbox_id=OuterRef("mailbox_id"), active=True)
            .values("mailbox_id")
            .annotate(n=Count("id"))
            .values("n")
        )
        PoolMailbox.objects.filter(pool=pool).update(active_bindings=Subquery(counts))
        with db_connection.cursor() as cursor:
            cursor.execute("ANALYZE")
        _, key = api_key_mint(principal=Principal.system(tenant), name="bench", permissions=ALL_PERMISSIONS)
        print(
            f"fixture: {options.mailboxes} mailboxes, {options.bindings} bindings, "
            f"built in {time.monotonic() - began:.1f} s"
        )
        return key, str(pool.pk), links

    def deliver(mailbox: Mailbox, provider: str) -> float:
        raw = simple_message(
            f"Your {provider} code", "Your verification code is 424242", sender=f"noreply@{provider}.example"
        )
        message = message_store(mailbox, raw)
        pipeline.message_parse(message_id=message.pk)
        pipeline.message_index(message_id=message.pk)
        return time.monotonic()

    def service_times() -> tuple[list[float], list[float]]:
        """binding_link_or_create without HTTP, DRF or the ASGI thread hop (queries and commits)."""
        from django.test.utils import CaptureQueriesContext

        from mailboxes.bindings.services import binding_link_or_create

        pool = MailboxPool.objects.select_related("domain").get()
        principal = Principal.system(pool.tenant)
        for label, account, provider in (("existing", "acct-1", PROVIDERS[0]), ("new", "counted-0", PROVIDERS[-1])):
            with CaptureQueriesContext(db_connection) as queries:
                binding_link_or_create(principal=principal, pool=pool, account_ref=account, provider=provider)
            statements = [q["sql"] for q in queries.captured_queries if q["sql"] not in {"BEGIN", "COMMIT"}]
            print(f"the service alone, {label} account: {len(statements)} statements")
        existing, new = [], []
        for number in random.sample(range(options.bindings), options.calls):
            began = time.perf_counter()
            binding_link_or_create(
                principal=principal,
                pool=pool,
                account_ref=f"acct-{number}",
                provider=PROVIDERS[number // options.mailboxes],
            )
            existing.append((time.perf_counter() - began) * 1000)
        for number in range(options.calls):
            began = time.perf_counter()
            binding_link_or_create(
                principal=principal, pool=pool, account_ref=f"direct-{number}", provider=PROVIDERS[-1 - number % 5]
            )
            new.append((time.perf_counter() - began) * 1000)
        return existing, new

    key, pool_id, links = await sync_to_async(prepare)()
    port = free_port()
    web = ChildProcess(
        [sys.executable, "-m", "uvicorn", "mailplatform.asgi:application", "--port", str(port), "--lifespan", "off"],
        env=env_with(ALLOWED_HOSTS="127.0.0.1,localhost"),
        cwd=ROOT,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as client:
            for _ in range(20):  # warm up the process (imports, connections)
                await client.post(
                    "/api/v1/bindings/link-or-create",
                    json={"account_ref": "acct-0", "provider": PROVIDERS[0], "pool": pool_id},
                )
            pid = web.process.pid
            floor = []
            cpu = cpu_seconds(pid)
            for _ in range(options.calls):
                began = time.perf_counter()
                await client.get("/api/v1/tenant/")
                floor.append((time.perf_counter() - began) * 1000)
            print(_line("floor: GET /api/v1/tenant/ (authentication and DRF alone)", floor, cpu_seconds(pid) - cpu))
            existing, new = [], []
            cpu = cpu_seconds(pid)
            for number in random.sample(range(options.bindings), options.calls):
                body = {
                    "account_ref": f"acct-{number}",
                    "provider": PROVIDERS[number // options.mailboxes],
                    "pool": pool_id,
                }
                began = time.perf_counter()
                response = await client.post("/api/v1/bindings/link-or-create", json=body)
                existing.append((time.perf_counter() - began) * 1000)
                assert response.status_code == 200, response.text
            existing_cpu, cpu = cpu_seconds(pid) - cpu, cpu_seconds(pid)
            for number in range(options.calls):
                body = {"account_ref": f"new-{number}", "provider": PROVIDERS[-1 - number % 5], "pool": pool_id}
                began = time.perf_counter()
                response = await client.post("/api/v1/bindings/link-or-create", json=body)
                new.append((time.perf_counter() - began) * 1000)
                assert response.status_code == 201, response.text
            new_cpu = cpu_seconds(pid) - cpu
        print(_line("link-or-create, existing account", existing, existing_cpu))
        print(_line("link-or-create, new account (allocates)", new, new_cpu))
        in_process = await sync_to_async(service_times)()
        print(_line("the service alone, in this process: existing account", in_process[0]))
        print(_line("the service alone, in this process: new account", in_process[1]))

        answered: dict[int, float] = {}
        tasks = [
            asyncio.create_task(waiter(port, f"/api/v1/links/{link}/codes/latest/?wait=300", key, answered, n))
            for n, (link, _, _, _) in enumerate(links)
        ]
        await until_idle(pid)
        assert not answered, f"{len(answered)} answered before any mail"
        waiting_rss = rss_mib(pid)
        indexed = [await sync_to_async(deliver)(mailbox, provider) for _, _, provider, mailbox in links]
        statuses = await asyncio.gather(*tasks)
        delays = [(answered[n] - indexed[n]) * 1000 for n in range(len(links)) if statuses[n] == 200]
        print(
            f"code proxy: {len(links)} waiters (RSS {waiting_rss:.0f} MiB), {statuses.count(200)} answered 200, "
            f"others {sorted(set(statuses) - {200})}; {len(links)} messages delivered in "
            f"{indexed[-1] - indexed[0]:.1f} s"
        )
        print(_line("code proxy, answered after its message's index commit", delays))
        print(f"load average {os.getloadavg()}")
    finally:
        web.stop()
        await sync_to_async(scratch_database_drop)(options.database)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mailboxes", type=int, default=20_000)
    parser.add_argument("--bindings", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--waiters", type=int, default=500)
    parser.add_argument("--database", default="mp_bench_bindings")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
