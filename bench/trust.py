"""Parse + index throughput with the trust verdicts on against off, in the same run.

    .venv/bin/python bench/trust.py [--messages 200] [--rounds 3] [--senders 40] [--size 10240]
                                    [--modes off,auth] [--database mp_bench_trust]

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
DKIM, DMARC, ARC). Prints msgs/s per mode and each mode's share of ``off``.
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

MODES: dict[str, dict[str, Any]] = {
    "off": {"AUTH_VERIFY": False},
    "auth": {"AUTH_VERIFY": True},
}


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
    parser.add_argument("--modes", default="off,auth")
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
            for _ in range(options.rounds):
                for mode in modes:
                    ids = batch()  # not timed: written as the drainer leaves them
                    authentication.dns_cache_clear()  # each round starts cold, as after a quiet spell
                    with override_settings(**MODES[mode]):
                        started = time.perf_counter()
                        for message_id in ids:
                            pipeline.message_parse(message_id=message_id, index=True)
                        rates[mode].append(len(ids) / (time.perf_counter() - started))
                    verified = Message.objects.filter(pk__in=ids, auth_dmarc="pass").count()
                    expected = len(ids) if MODES[mode].get("AUTH_VERIFY", False) else 0
                    assert verified == expected, (mode, verified, expected)
            base = statistics.median(rates[modes[0]])
            for mode in modes:
                median = statistics.median(rates[mode])
                runs = ", ".join(f"{rate:.1f}" for rate in rates[mode])
                print(f"{mode:>6}: {median:6.1f} msg/s median ({runs}); {median / base * 100:5.1f} % of {modes[0]}")
            print(f"load average {os.getloadavg()}")
    finally:
        zone.stop()
        import redis

        redis.Redis.from_url(os.environ["CELERY_BROKER_URL"]).delete("index")
        connections.close_all()
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
