"""Parse + index throughput with the trust verdicts on against off, in the same run.

    .venv/bin/python bench/trust.py [--messages 200] [--rounds 3] [--senders 40] [--size 10240]
                                    [--modes off,auth] [--smtp N] [--latency N] [--database mp_bench_trust]

What a parse worker does per message (``pipeline.message_parse(index=True)``, as in
bench/parse_index.py), once with ``AUTH_VERIFY`` off and once on, in alternating rounds of
the same process so both see the same machine. With verification on, every message is
checked for real against an authoritative DNS server on loopback (the test suite's Zone,
its answers served with a 300-second TTL as real zones do): SPF of the MAIL FROM domain
from 127.0.0.1, the DKIM signature (RSA 2048, made here per sending domain), the DMARC
record and alignment, the ARC headers (none). Messages come from ``--senders`` domains in
turn, so the per-process DNS cache (AUTH_DNS_CACHE_TTL) is used as it would be by a burst
from a few senders; each message is distinct, so no verdict is reused.

Modes are named sets of settings (``MODES``): ``off`` (nothing verified), ``auth`` (SPF,
DKIM, DMARC, ARC). Prints msgs/s per mode and each mode's share of ``off``, by wall clock and
by this process's CPU time (which includes the loopback DNS server's threads: pessimistic for
``auth``; PostgreSQL's share is in neither).

Antivirus: ``scan`` (every message through a real clamd, Debian's, started here with a
one-signature database; tag mode) and ``both`` (``auth`` and ``scan``). ``--smtp N`` also
times the SMTP ``250`` itself: N messages over a real socket to the in-process SMTP server
(real spool with fsync, the recipient directory from the database), the client's DATA-to-250
round trip, p50 and p95, with the domain's antivirus mode off, tag, quarantine and reject
(only reject scans before the 250).

``--latency N`` times N messages per mode from the SMTP ``250`` to indexed: over a real socket
to the in-process SMTP server, then at once through the drainer and the parse step with
indexing under the mode's settings, the modes' messages sent in turn (:func:`smtp_to_indexed`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLAMD = "<the bench's clamd>"  # replaced by the URL of the clamd started here
MODES: dict[str, dict[str, Any]] = {
    "off": {"AUTH_VERIFY": False, "CLAMD_URL": ""},
    "auth": {"AUTH_VERIFY": True, "CLAMD_URL": ""},
    "scan": {"AUTH_VERIFY": False, "CLAMD_URL": CLAMD, "ANTIVIRUS_MODE": "tag"},
    "both": {"AUTH_VERIFY": True, "CLAMD_URL": CLAMD, "ANTIVIRUS_MODE": "tag"},
}


def _smtp_server_start(handler: Any) -> tuple[Any, Any, int]:
    """The in-process SMTP server on a loopback port, in a thread of its own."""
    import asyncio
    import threading

    from ingest.smtp import IngestSMTP

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port = 0

    def run() -> None:
        nonlocal port
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(loop.create_server(lambda: IngestSMTP(handler, loop=loop), "127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    return loop, thread, port


def smtp_latencies(mailbox: Any, clamd_url: str, count: int, size: int) -> None:
    """DATA-to-250 round trips (p50, p95) per antivirus mode of the recipient's domain.

    One server per mode (each with a directory snapshot taken while the domain had that
    mode), all running at once; the messages go to them in turn, so every mode sees the same
    moments of a machine whose load comes and goes.
    """
    import smtplib
    import tempfile

    from ingest.directory import RecipientDirectory
    from ingest.smtp import IngestHandler, Limits
    from ingest.spool import Spool, SpoolWriter

    body = message_bytes(size, 0, "smtp.bench.test")
    modes = ("off", "tag", "quarantine", "reject")
    servers = {}
    for mode in modes:
        type(mailbox.domain).objects.filter(pk=mailbox.domain_id).update(antivirus_mode=mode)
        directory = RecipientDirectory(check_misses=False)
        directory.reload()
        directory.max_staleness = 3600
        handler = IngestHandler(
            directory=directory,
            writer=SpoolWriter(Spool(tempfile.mkdtemp(prefix="mp-bench-spool-"))),
            limits=Limits(rate_per_ip=0, rate_per_tenant=0, spool_low_water=0),
            hostname="mx.bench.test",
            clamd_url=clamd_url,
        )
        loop, thread, port = _smtp_server_start(handler)
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        client.ehlo("client.bench.test")
        servers[mode] = (handler, loop, thread, client)
    type(mailbox.domain).objects.filter(pk=mailbox.domain_id).update(antivirus_mode="")
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for number in range(count + 10):
        for mode in modes:
            client = servers[mode][3]
            client.mail("bounce@smtp.bench.test")
            client.rcpt(mailbox.address)
            started = time.perf_counter()
            code, _ = client.data(body)
            if number >= 10:  # warm-up left out
                times[mode].append(time.perf_counter() - started)
            assert code == 250, code
    for mode in modes:
        handler, loop, thread, client = servers[mode]
        client.quit()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        handler.writer.close()
        ordered = sorted(times[mode])
        p50, p95 = ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.95)]
        print(f"smtp {mode:>10}: DATA to 250 p50 {p50 * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms ({count} messages)")


def smtp_to_indexed(mailbox: Any, senders: list[str], key: Any, modes: list[str], count: int, size: int) -> None:
    """SMTP ``250`` to indexed (p50, p95) per mode, the messages of every mode sent in turn.

    Each message goes over a real socket to the in-process SMTP server (real spool with
    fsync), then, in this process and at once, through the drainer (``spool_entry_drain``:
    blob PUT, the Message row) and the parse step with indexing (``message_parse(index=True)``)
    under the mode's settings; the clock runs from the client reading the ``250`` to the
    indexed commit. No broker or worker wait is in it: it is the work on the path.
    """
    import smtplib
    import tempfile

    from django.test.utils import override_settings

    from ingest.directory import RecipientDirectory
    from ingest.services import spool_entry_drain
    from ingest.smtp import IngestHandler, Limits
    from ingest.spool import Spool, SpoolWriter
    from mailboxes import pipeline
    from mailboxes.models import Message
    from mailboxes.tests import authentication_helpers as helpers

    directory = RecipientDirectory(check_misses=False)
    directory.reload()
    directory.max_staleness = 3600
    handler = IngestHandler(
        directory=directory,
        writer=SpoolWriter(Spool(tempfile.mkdtemp(prefix="mp-bench-spool-"))),
        limits=Limits(rate_per_ip=0, rate_per_tenant=0, spool_low_water=0),
        hostname="mx.bench.test",
    )
    loop, thread, port = _smtp_server_start(handler)
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.ehlo("client.bench.test")
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    number = 0
    try:
        for round_number in range(count + 10):
            for mode in modes:
                sender = senders[number % len(senders)]
                raw = helpers.dkim_sign(message_bytes(size, 10**6 + number, sender), key, domain=sender)
                number += 1
                client.mail(f"bounce@{sender}")
                client.rcpt(mailbox.address)
                code, reply = client.data(raw)
                accepted = time.perf_counter()
                assert code == 250, (code, reply)
                queue_id = reply.decode().rsplit(" ", 1)[-1]
                with override_settings(**MODES[mode]):
                    assert spool_entry_drain(handler.writer.spool, queue_id) == "stored"
                    [message_id] = Message.objects.filter(trace_id=queue_id).values_list("pk", flat=True)
                    assert pipeline.message_parse(message_id=message_id, index=True) == "indexed"
                if round_number >= 10:  # warm-up left out
                    times[mode].append(time.perf_counter() - accepted)
                verified = Message.objects.filter(pk=message_id, auth_dmarc="pass").exists()
                assert verified == bool(MODES[mode].get("AUTH_VERIFY")), (mode, verified)
    finally:
        client.quit()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        handler.writer.close()
    for mode in modes:
        ordered = sorted(times[mode])
        p50, p95 = ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.95)]
        print(f"250 to indexed {mode:>6}: p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms ({count} messages)")


def message_bytes(size: int, number: int, sender: str) -> bytes:
    text = (
        f"Hello,\r\n\r\nYour verification code is {100000 + number}.\r\n"
        f"Confirm at https://{sender}/confirm?token=abc\r\n\r\nThanks,\r\nThe Shop\r\n"
    )
    head = (
        f"From: The Shop <no-reply@{sender}>\r\nTo: box@bench.example.test\r\n"
        f"Subject: Invoice {number} and your code\r\nMessage-ID: <{uuid.uuid4().hex}@{sender}>\r\n"
        "Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    filler = "".join(f"Line {line} of the order summary, nothing to see here.\r\n" for line in range(size // 50))
    return (head + text + filler)[:size].encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200, help="messages per mode per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--senders", type=int, default=40, help="sending domains, each with SPF, DKIM and DMARC")
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--modes", default="off,auth,scan,both")
    parser.add_argument("--smtp", type=int, default=0, help="also time N SMTP 250s per antivirus mode")
    parser.add_argument("--latency", type=int, default=0, help="also time N messages per mode from SMTP 250 to indexed")
    parser.add_argument("--database", default="mp_bench_trust")
    options = parser.parse_args()
    modes = options.modes.split(",")

    import psycopg

    name = options.database
    admin = "postgres://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    os.environ.update(
        DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{name}",
        DATA_DIR=str(ROOT / "var" / f"bench-{name}"),
        LOG_LEVEL="ERROR",
        DJANGO_SETTINGS_MODULE="mailplatform.settings",
        SMTP_HOSTNAME="mx.bench.test",
    )
    os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/7")
    for variable in ("S3_BUCKET", "S3_ENDPOINT_URL"):
        os.environ.pop(variable, None)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connections
    from django.test.utils import override_settings

    from mailboxes import authentication, pipeline
    from mailboxes.models import Mailbox, Message
    from mailboxes.tests import authentication_helpers as helpers
    from mailboxes.tests.helpers import message_store
    from mailplatform.testing import Zone
    from tenants.models import Domain, Tenant

    class LongTtlZone(Zone):
        def resolve(self, request: Any, handler: Any) -> Any:
            reply = super().resolve(request, handler)
            for record in reply.rr:
                record.ttl = 300
            return reply

    clamd_server = None
    if any(MODES[mode].get("CLAMD_URL") == CLAMD for mode in modes) or options.smtp:
        from mailplatform.testing_clamd import ClamdServer

        clamd_server = ClamdServer().start()
        for settings_of_mode in MODES.values():
            if settings_of_mode.get("CLAMD_URL") == CLAMD:
                settings_of_mode["CLAMD_URL"] = clamd_server.unix_url
    zone = LongTtlZone()
    senders = [f"shop{number}.bench.test" for number in range(options.senders)]
    key = helpers.rsa_key("bench")
    for sender in senders:
        helpers.publish_sender(zone, sender, spf="v=spf1 ip4:127.0.0.1 -all", dmarc="v=DMARC1; p=reject")
        helpers.publish_key(zone, key, domain=sender)
    try:
        with override_settings(DNS_RESOLVERS=[("127.0.0.1", zone.port)]):
            call_command("migrate", verbosity=0)
            tenant = Tenant.objects.create(name="Trust", slug="trust")
            domain = Domain.objects.create(tenant=tenant, name="bench.example.test", state=Domain.State.VERIFIED)
            mailbox = Mailbox.objects.create(
                tenant=tenant, domain=domain, local_part="box", address="box@" + domain.name
            )
            print(
                f"one process, one thread; {options.messages} messages of {options.size // 1024} KiB per mode"
                f" and round, {options.rounds} rounds, {len(senders)} sending domains; load average {os.getloadavg()}"
            )
            counter = 0

            def batch() -> list[Any]:
                nonlocal counter
                ids = []
                for _ in range(options.messages):
                    sender = senders[counter % len(senders)]
                    raw = helpers.dkim_sign(message_bytes(options.size, counter, sender), key, domain=sender)
                    message = message_store(mailbox, raw)
                    Message.objects.filter(pk=message.pk).update(
                        remote_ip="127.0.0.1", helo=f"mail.{sender}", mail_from=f"bounce@{sender}"
                    )
                    ids.append(message.pk)
                    counter += 1
                return ids

            for mode in modes:  # warm: imports, the suffix list, connections
                with override_settings(**MODES[mode]):
                    for message_id in batch()[:10]:
                        pipeline.message_parse(message_id=message_id, index=True)
            rates: dict[str, list[float]] = {mode: [] for mode in modes}
            cpu_rates: dict[str, list[float]] = {mode: [] for mode in modes}
            for _ in range(options.rounds):
                for mode in modes:
                    ids = batch()  # not timed: written as the drainer leaves them
                    authentication.dns_cache_clear()  # each round starts cold, as after a quiet spell
                    with override_settings(**MODES[mode]):
                        started, cpu_started = time.perf_counter(), time.process_time()
                        for message_id in ids:
                            pipeline.message_parse(message_id=message_id, index=True)
                        rates[mode].append(len(ids) / (time.perf_counter() - started))
                        cpu_rates[mode].append(len(ids) / (time.process_time() - cpu_started))
                    verified = Message.objects.filter(pk__in=ids, auth_dmarc="pass").count()
                    expected = len(ids) if MODES[mode].get("AUTH_VERIFY", False) else 0
                    assert verified == expected, (mode, verified, expected)
                    scanned = Message.objects.filter(pk__in=ids, antivirus_verdict="clean").count()
                    assert scanned == (len(ids) if MODES[mode].get("CLAMD_URL") else 0), (mode, scanned)
            base = statistics.median(rates[modes[0]])
            cpu_base = statistics.median(cpu_rates[modes[0]])
            for mode in modes:
                median, cpu = statistics.median(rates[mode]), statistics.median(cpu_rates[mode])
                runs = ", ".join(f"{rate:.1f}" for rate in rates[mode])
                print(
                    f"{mode:>6}: {median:6.1f} msg/s wall median ({runs}), {median / base * 100:5.1f} % of {modes[0]};"
                    f" {cpu:6.1f} msg/s per CPU-second of this process, {cpu / cpu_base * 100:5.1f} %"
                )
            if options.latency:
                smtp_to_indexed(mailbox, senders, key, modes, options.latency, options.size)
            if options.smtp and clamd_server is not None:
                smtp_latencies(mailbox, clamd_server.unix_url, options.smtp, options.size)
            print(f"load average {os.getloadavg()}")
    finally:
        zone.stop()
        if clamd_server is not None:
            clamd_server.stop()
        import redis

        redis.Redis.from_url(os.environ["CELERY_BROKER_URL"]).delete("index", "parse")
        connections.close_all()
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
