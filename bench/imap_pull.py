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
   to the ``indexer.indexed`` event of the Message parsed from it: p50 / p95 / max, split into
   APPEND → spooled (Dovecot tells the IDLE session, the runner fetches and writes the spool
   entry: ``Message.received_at`` is the spool write), spooled → ``ingest.received`` (the
   runner's drain: blob PUT, rows, events) and ``ingest.received`` → ``indexer.indexed`` (the
   Celery parse and index). The CPU seconds the runner, Dovecot's processes and the worker
   spent while the messages came in are printed per message; ``--py-spy FILE`` records the
   runner meanwhile (``py-spy record``, collapsed stacks) and prints where its time went.

Dovecot learns of new mail through inotify, one instance per IDLE session: the harness raises
``fs.inotify.max_user_instances`` to cover the sessions (as root) and prints what it is; below
that Dovecot polls every ``--idle-check`` seconds.

The machine's other load is printed with the figures (the runner, Dovecot, PostgreSQL and the
worker share its cores). The database and Dovecot's folder are removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.waiters import percentile, rss_mib, scratch_database, scratch_database_drop  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds(parent: int) -> float:
    """CPU time of ``parent``'s live children plus what its finished children used."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()
    return total + (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def profile_summary(path: Path, top: int = 25) -> list[str]:
    """py-spy's collapsed stacks: the share of samples in which each function appears."""
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        samples = int(number)
        total += samples
        for frame in set(stack.split(";")):
            counts[frame] = counts.get(frame, 0) + samples
    ranked = sorted(counts.items(), key=lambda item: -item[1])[:top]
    return [f"{count * 100 / max(total, 1):5.1f} %  {frame}" for frame, count in ranked]


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
        print(
            f"fs.inotify.max_user_instances {dovecot.inotify_instances}, "
            f"Dovecot mailbox_idle_check_interval {dovecot.idle_check} s"
        )
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
        profiler = None
        if options.py_spy:
            profiler = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--format", "raw",
                    "--rate", "200", "--nonblocking", "--output", options.py_spy,
                    "--duration", str(int(options.seconds) + 5),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1)
        cpu = {"runner": cpu_seconds(pid), "dovecot": children_cpu_seconds(dovecot.process.pid),
               "worker": children_cpu_seconds(worker.process.pid) + cpu_seconds(worker.process.pid)}  # fmt: skip
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
        used = {
            "runner": cpu_seconds(pid) - cpu["runner"],
            "dovecot": children_cpu_seconds(dovecot.process.pid) - cpu["dovecot"],
            "worker": children_cpu_seconds(worker.process.pid) + cpu_seconds(worker.process.pid) - cpu["worker"],
        }
        if profiler is not None:
            profiler.wait(60)
        subjects: dict[object, str] = dict(Message.objects.filter(mailbox=mailbox).values_list("pk", "subject"))
        received = dict(
            Event.objects.filter(type="ingest.received", mailbox_id=mailbox.pk).values_list("message_id", "timestamp")
        )
        spooled: dict[object, Any] = dict(Message.objects.filter(mailbox=mailbox).values_list("pk", "received_at"))
        stored = [
            stamp.timestamp() - saved[subjects[message_id]]
            for message_id, stamp in received.items()
            if subjects.get(message_id, "") in saved
        ]
        to_spool: list[float] = []
        spool_to_received: list[float] = []
        received_to_indexed: list[float] = []
        for message_id, stamp in indexed.items():
            token = subjects.get(message_id, "")
            if token in saved:
                latencies.append(stamp.timestamp() - saved[token])
                to_spool.append(spooled[message_id].timestamp() - saved[token])
                if message_id in received:
                    spool_to_received.append(received[message_id].timestamp() - spooled[message_id].timestamp())
                    received_to_indexed.append(stamp.timestamp() - received[message_id].timestamp())
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
        for label, samples in (
            ("APPEND to ingest.received (fetched, spooled, drained: the runner's part)", stored),
            ("  APPEND to spooled (Dovecot's notice, the runner's fetch and spool write)", to_spool),
            ("  spooled to ingest.received (the runner's drain: blob, rows, events)", spool_to_received),
            ("ingest.received to indexer.indexed (Celery parse and index)", received_to_indexed),
        ):
            if samples:
                print(
                    f"{label}: p50 {percentile(samples, 0.5):.2f} s, p95 {percentile(samples, 0.95):.2f} s, "
                    f"max {max(samples):.2f} s"
                )
        count = max(1, len(latencies))
        shares = [
            f"{name} {seconds:.1f} s ({seconds * 1000 / count:.0f} ms a message)" for name, seconds in used.items()
        ]
        print("CPU while the messages came in: " + ", ".join(shares))
        if options.py_spy and Path(options.py_spy).exists():
            print(f"runner profile (py-spy, {options.py_spy}), share of samples per function:")
            for line in profile_summary(Path(options.py_spy)):
                print("   ", line)
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
        "--idle-check", type=int, default=None,
        help="Dovecot's mailbox_idle_check_interval (default: 30 s when inotify covers every session, "
        "else 1 s: past fs.inotify.max_user_instances Dovecot polls instead of being told)",
    )  # fmt: skip
    parser.add_argument("--py-spy", default="", metavar="FILE", help="record the runner with py-spy into FILE")
    parser.add_argument("--database", default="mp_h1_bench_imap")
    parser.add_argument("--broker", default=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/1"))
    run(parser.parse_args())


if __name__ == "__main__":
    main()
