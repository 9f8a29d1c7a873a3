"""IMAP pull at scale: one ``runconnectors`` process holding N IDLE accounts on a local Dovecot.

    .venv/bin/python bench/imap_pull.py [--accounts 1000] [--rate 20] [--seconds 30]
                                        [--workers 2] [--database mp_h1_bench_imap]

Builds a scratch PostgreSQL database (migrated) with one tenant and one mailbox, starts a
throwaway Dovecot (ingest/tests/dovecot.py) with ``--accounts`` users, then:

1. starts one ``manage.py runconnectors`` and measures its RSS with no connector;
2. creates one password connector per account (plaintext on loopback, CONNECTOR_ALLOW_INSECURE),
   waits until every one is ``idle`` (logged in, caught up, in IDLE), waits for the CPU to
   settle, and measures the RSS again: (RSS with N - RSS empty) / N is the cost of one idle
   account; then the CPU time the runner uses over 10 idle seconds;
3. starts a real Celery worker (``--workers`` processes, every queue) and appends messages
   (``doveadm save``) at ``--rate`` a second across random accounts for ``--seconds``; each
   message's subject carries a token, and the latency is from the end of its ``doveadm save``
   to the ``indexer.indexed`` event of the Message parsed from it: p50 / p95 / max.

The machine's other load is printed with the figures (the runner, Dovecot, PostgreSQL and the
worker share its cores). The database and Dovecot's folder are removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.waiters import percentile, rss_mib, scratch_database, scratch_database_drop  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pid: int, *, quiet: float = 0.05, minimum: float = 3.0, limit: float = 120.0) -> None:
    """Until the process's CPU time stops growing (less than ``quiet`` s of CPU a second)."""
    began, previous = time.monotonic(), cpu_seconds(pid)
    while time.monotonic() - began < limit:
        time.sleep(1.0)
        now = cpu_seconds(pid)
        if now - previous < quiet and time.monotonic() - began > minimum:
            return
        previous = now


def run(options: argparse.Namespace) -> None:
    scratch_database(options.database)
    os.environ.update(
        CONNECTOR_ALLOW_INSECURE="true",
        CONNECTOR_STARTUP_STAGGER=str(options.stagger),
        CONNECTOR_LEASE_SECONDS="60",
        CELERY_BROKER_URL=options.broker,
        METRICS_DIR="",
    )
    import django

    django.setup()
    from django.core.management import call_command

    from audit.models import Event
    from ingest.models import Connector
    from ingest.tests.dovecot import start_dovecot
    from mailboxes.models import Mailbox, Message
    from mailplatform.testing import ALL_QUEUES, ChildProcess, env_with
    from tenants import crypto
    from tenants.models import Domain, Tenant

    call_command("migrate", verbosity=0)
    tenant = Tenant.objects.create(name="IMAP bench", slug="imap-bench")
    domain = Domain.objects.create(tenant=tenant, name="imap-bench.example.test", state=Domain.State.VERIFIED)
    mailbox = Mailbox.objects.create(tenant=tenant, domain=domain, local_part="pull", address=f"pull@{domain.name}")
    dovecot = start_dovecot(
        oauth=False, accounts=options.accounts, max_connections=options.accounts + 50, idle_check=options.idle_check
    )
    runner = worker = None
    try:
        accounts = [dovecot.account_new() for _ in range(options.accounts)]
        env = env_with(LOG_LEVEL="WARNING")
        runner = ChildProcess(
            [sys.executable, "manage.py", "runconnectors", "--capacity", str(options.accounts + 10)], env=env, cwd=ROOT
        )
        runner.wait_for_line("runconnectors ready", timeout=60)
        pid = runner.process.pid
        settle(pid)
        empty = rss_mib(pid)

        def connectors_add(batch: list) -> None:
            Connector.objects.bulk_create(
                [
                    Connector(
                        tenant=tenant,
                        mailbox=mailbox,
                        host="127.0.0.1",
                        port=dovecot.port,
                        tls_mode="none",
                        username=account.username,
                        password_encrypted=crypto.encrypt(account.password),
                        folders=["INBOX"],
                    )
                    for account in batch
                ]
            )

        def wait_idle(count: int) -> None:
            began = time.monotonic()
            while Connector.objects.filter(state=Connector.State.IDLE).count() < count:
                if time.monotonic() - began > 300:
                    raise RuntimeError(f"only {Connector.objects.filter(state='idle').count()} of {count} idle")
                time.sleep(0.5)

        # A few accounts first: what the first session imports and caches is not per account.
        warm = min(10, options.accounts // 2)
        connectors_add(accounts[:warm])
        wait_idle(warm)
        settle(pid)
        warmed = rss_mib(pid)
        connectors_add(accounts[warm:])
        began = time.monotonic()
        while Connector.objects.filter(state=Connector.State.IDLE).count() < options.accounts:
            if time.monotonic() - began > 300:
                raise RuntimeError(
                    f"only {Connector.objects.filter(state='idle').count()} of {options.accounts} idle after 300 s"
                )
            time.sleep(1)
        connected_after = time.monotonic() - began
        settle(pid)
        time.sleep(options.stagger + 35)  # the runner hands freed heap back 30 s after its last claim
        settle(pid)
        held = rss_mib(pid)
        cpu_before = cpu_seconds(pid)
        time.sleep(10)
        idle_cpu = (cpu_seconds(pid) - cpu_before) / 10 * 100

        worker = ChildProcess(
            [
                sys.executable, "-m", "celery", "-A", "mailplatform", "worker", "--pool=prefork",
                f"--concurrency={options.workers}", "--loglevel=INFO", f"--queues={ALL_QUEUES}",
                "--hostname=bench-imap@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
            ],
            env=env,
            cwd=ROOT,
        )  # fmt: skip
        worker.wait_for_line(" ready.", timeout=120)
        saved: dict[str, float] = {}
        failures: list[int] = []
        lock = threading.Lock()

        def append(number: int) -> None:
            token = f"bench-{number}-{random.randrange(1 << 30)}"
            account = random.choice(accounts)
            content = (
                f"From: a@source.example\r\nTo: {account.username}@source.example\r\nSubject: {token}\r\n"
                f"Message-ID: <{token}@source.example>\r\n\r\nhello {number}\r\n"
            ).encode()
            try:
                account.save(content)
            except RuntimeError:
                failures.append(number)
                return
            with lock:
                saved[token] = time.time()

        total = int(options.rate * options.seconds)
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=8) as pool:
            for number in range(total):
                delay = start + number / options.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(append, number)
        deadline = time.monotonic() + 120
        latencies: list[float] = []
        while time.monotonic() < deadline:
            indexed = dict(
                Event.objects.filter(type="indexer.indexed", mailbox_id=mailbox.pk).values_list(
                    "message_id", "timestamp"
                )
            )
            if len(indexed) >= total - len(failures):
                break
            time.sleep(1)
        subjects: dict[object, str] = dict(Message.objects.filter(mailbox=mailbox).values_list("pk", "subject"))
        received = dict(
            Event.objects.filter(type="ingest.received", mailbox_id=mailbox.pk).values_list("message_id", "timestamp")
        )
        stored = [
            stamp.timestamp() - saved[subjects[message_id]]
            for message_id, stamp in received.items()
            if subjects.get(message_id, "") in saved
        ]
        for message_id, stamp in indexed.items():
            token = subjects.get(message_id, "")
            if token in saved:
                latencies.append(stamp.timestamp() - saved[token])
        duplicates = Message.objects.filter(mailbox=mailbox).count() - len(set(subjects.values()))
        print(f"one runconnectors process, {options.accounts} IDLE accounts on a local Dovecot (plaintext, loopback)")
        print(f"all idle {connected_after:.1f} s after the last {options.accounts - warm} connectors were created")
        print(
            f"runner RSS: empty {empty:.1f} MiB, {warm} accounts {warmed:.1f} MiB, {options.accounts} idle accounts "
            f"{held:.1f} MiB: {(held - warmed) * 1024 / (options.accounts - warm):.0f} KiB per further idle account"
        )
        print(f"runner CPU at idle: {idle_cpu:.2f} % of one core")
        print(
            f"{len(saved)} messages appended at {options.rate}/s ({len(failures)} doveadm saves failed); "
            f"{len(latencies)} indexed; duplicates {duplicates}; "
            f"APPEND to indexer.indexed: p50 {percentile(latencies, 0.5):.2f} s, "
            f"p95 {percentile(latencies, 0.95):.2f} s, max {max(latencies):.2f} s"
            if latencies
            else f"{total} appended, none indexed"
        )
        if stored:
            print(
                f"APPEND to ingest.received (fetched, spooled, stored: the runner's part): "
                f"p50 {percentile(stored, 0.5):.2f} s, p95 {percentile(stored, 0.95):.2f} s, max {max(stored):.2f} s"
            )
        print(f"load average {os.getloadavg()}, {os.cpu_count()} cores")
    finally:
        for child in (worker, runner):
            if child is not None:
                child.stop()
        dovecot.stop()
        scratch_database_drop(options.database)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="messages appended a second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes")
    parser.add_argument("--stagger", type=int, default=10, help="CONNECTOR_STARTUP_STAGGER of the runner")
    parser.add_argument(
        "--idle-check", type=int, default=1,
        help="Dovecot's mailbox_idle_check_interval: how often a session looks for new mail once "
        "inotify instances (fs.inotify.max_user_instances) run out",
    )  # fmt: skip
    parser.add_argument("--database", default="mp_h1_bench_imap")
    parser.add_argument("--broker", default=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/1"))
    run(parser.parse_args())


if __name__ == "__main__":
    main()
