"""Search and list latency over a bulk-generated PostgreSQL database.

    # build the data (about 1,000,000 messages in 10 tenants; a mailbox of 100,000 in tenant 0)
    .venv/bin/python bench/search.py --database mp_parse2_bench generate --messages 1000000
    # measure (through the real DRF API, in-process, with a tenant-wide API key per tenant)
    .venv/bin/python bench/search.py --database mp_parse2_bench measure [--repeat 5]
    # drop the database
    .venv/bin/python bench/search.py --database mp_parse2_bench drop

``generate`` migrates a new database, creates 10 tenants (one domain and 10 mailboxes each,
plus a ``big`` mailbox in tenant 0 that gets the first 100,000 rows) with the ORM, then
inserts the messages with one ``INSERT ... SELECT generate_series`` per 100,000 rows: the
subject, addresses and a 60-word body drawn from a 2,000-word vocabulary with a skewed
(Zipf-like) distribution, 10 % with attachments, 10 % with a code, 5 % tagged, half read.
The weighted tsvector is built in the same SQL with the same weights and configuration as
``mailboxes.pipeline.search_vector_expression``. Secondary indexes (GIN included) are
dropped before the load and rebuilt after it, as one would for a bulk import.

``measure`` times ``GET /api/v1/messages/?q=`` (first page of 50, newest first) for typical
queries in every tenant, and ``GET /api/v1/messages/?mailbox=<big>`` for the first page and
20 pages deep through the cursor, and prints p50/p95 in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TENANTS = 10
MAILBOXES_PER_TENANT = 10
BIG_MAILBOX = 100_000
CHUNK = 100_000
COMMON = [
    "invoice",
    "order",
    "shipped",
    "password",
    "reset",
    "account",
    "verify",
    "welcome",
    "meeting",
    "report",
    "payment",
    "receipt",
    "delivery",
    "update",
    "security",
    "alert",
    "confirm",
    "subscription",
    "newsletter",
    "team",
    "project",
    "review",
    "schedule",
    "ticket",
    "support",
    "refund",
    "offer",
    "discount",
    "travel",
    "booking",
    "flight",
    "hotel",
    "calendar",
    "invite",
    "document",
    "contract",
    "signature",
    "login",
    "device",
    "code",
    "access",
    "request",
    "approval",
    "budget",
    "quarter",
    "sales",
    "customer",
]
QUERIES = [
    "invoice",
    "password reset",
    '"password reset"',
    "refund -shipped",
    "from:sender42",
    "subject:invoice",
    "has:attachment contract",
    "is:unread meeting",
    "tag:promo",
    "after:2025-06-01 payment",
    "w1700",  # a rare word
    "nosuchwordanywhere",
]


def database_url(name: str) -> str:
    return f"postgres://postgres@127.0.0.1:5432/{name}"


def django_setup(name: str) -> None:
    os.environ["DATABASE_URL"] = database_url(name)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailplatform.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("ALLOWED_HOSTS", "testserver")
    os.environ.setdefault("DATA_DIR", str(ROOT / "var" / f"bench-{name}"))
    import django

    django.setup()


def admin_execute(sql: str) -> None:
    import psycopg

    with psycopg.connect(database_url("postgres"), autocommit=True) as admin:
        admin.execute(sql)


def generate(name: str, messages: int) -> None:
    admin_execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin_execute(f'CREATE DATABASE "{name}"')
    django_setup(name)
    from django.core.management import call_command
    from django.db import connection

    from mailboxes.models import Mailbox
    from tenants.models import Domain, Tenant

    started = time.monotonic()
    call_command("migrate", verbosity=0)
    mailbox_ids: list[str] = []
    tenant_ids: list[str] = []
    big = ""
    for number in range(TENANTS):
        tenant = Tenant.objects.create(name=f"Bench {number}", slug=f"bench-{number}")
        domain = Domain.objects.create(tenant=tenant, name=f"bench{number}.example.test", state=Domain.State.VERIFIED)
        tenant_ids.append(str(tenant.pk))
        for box in range(MAILBOXES_PER_TENANT):
            mailbox = Mailbox.objects.create(
                tenant=tenant, domain=domain, local_part=f"box{box}", address=f"box{box}@{domain.name}"
            )
            mailbox_ids.append(str(mailbox.pk))
        if number == 0:
            big = str(
                Mailbox.objects.create(tenant=tenant, domain=domain, local_part="big", address=f"big@{domain.name}").pk
            )
    big_rows = min(BIG_MAILBOX, messages // 2)
    print(f"schema and {len(mailbox_ids) + 1} mailboxes in {time.monotonic() - started:.1f} s", flush=True)

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'mailboxes_message' "
            "AND indexname NOT LIKE '%%pkey' AND indexdef NOT LIKE 'CREATE UNIQUE%%'"
        )
        indexes = cursor.fetchall()
        for index_name, _ in indexes:
            cursor.execute(f'DROP INDEX "{index_name}"')
        cursor.execute("DROP TABLE IF EXISTS bench_words")
        vocabulary = COMMON + [f"w{n}" for n in range(len(COMMON), 2000)]
        cursor.execute("CREATE TABLE bench_words (id int PRIMARY KEY, word text)")
        cursor.executemany("INSERT INTO bench_words VALUES (%s, %s)", list(enumerate(vocabulary, start=1)))
    load_started = time.monotonic()
    for offset in range(0, messages, CHUNK):
        upto = min(messages, offset + CHUNK)
        chunk_started = time.monotonic()
        with connection.cursor() as cursor:
            cursor.execute(
                GENERATE_SQL,
                {**_params(tenant_ids, mailbox_ids, big, big_rows, messages), "lo": offset, "hi": upto - 1},
            )
        print(f"  rows {offset:>9,}..{upto - 1:>9,} in {time.monotonic() - chunk_started:.1f} s", flush=True)
    print(f"inserted {messages:,} rows in {time.monotonic() - load_started:.1f} s", flush=True)
    index_started = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute("SET maintenance_work_mem = '512MB'")
        for _, definition in indexes:
            cursor.execute(definition)
        cursor.execute("DROP TABLE bench_words")
        cursor.execute("VACUUM ANALYZE mailboxes_message")
    print(f"rebuilt {len(indexes)} indexes and analyzed in {time.monotonic() - index_started:.1f} s", flush=True)
    print(f"generate: {time.monotonic() - started:.1f} s in all", flush=True)


def _params(tenant_ids: list[str], mailbox_ids: list[str], big: str, big_rows: int, total: int) -> dict[str, Any]:
    return {
        "tenants": tenant_ids,
        "mailboxes": mailbox_ids,
        "big": big,
        "big_rows": big_rows,
        "total": total,
        "per_tenant": MAILBOXES_PER_TENANT,
        "ntenants": TENANTS,
    }


# One row per g: tenant g % 10 (tenant 0 for the first big_rows rows, all in the big mailbox),
# received_at spread over the past year with g increasing with time (tags, attachments and codes
# follow g / 10, so every tenant has its share); words from bench_words
# with a skewed index (floor(2000 * random()^3)), so a few words are very common.
GENERATE_SQL = """
WITH vocabulary AS (SELECT array_agg(word ORDER BY id) AS words FROM bench_words),
rows AS (
    SELECT
        g,
        CASE WHEN g < %(big_rows)s THEN 0 ELSE g %% %(ntenants)s END AS tenant_number,
        (SELECT string_agg(v.words[1 + floor(2000 * random() ^ 3)::int + 0 * s], ' ')
            FROM generate_series(1, 5) AS s WHERE g IS NOT NULL) AS subject,
        (SELECT string_agg(v.words[1 + floor(2000 * random() ^ 3)::int + 0 * s], ' ')
            FROM generate_series(1, 60) AS s WHERE g IS NOT NULL) AS body,
        'sender' || (g::bigint * 7919 %% 500) AS sender,
        random() AS r
    FROM generate_series(%(lo)s::int, %(hi)s::int) AS g, vocabulary v
)
INSERT INTO mailboxes_message (
    id, tenant_id, mailbox_id, state, state_changed_at, state_reason, source, mail_from, rcpt, tags,
    remote_ip, helo, tls, size, sha256, storage_key, trace_id, received_at, created_at,
    subject, from_address, from_name, "to", cc, reply_to, sender, recipients_text, date, message_id,
    in_reply_to, "references", thread_id, headers, text, html, stripped_text, codes, links,
    authentication_results, received_spf, has_attachments, attachment_names, defects, is_read,
    parsed_at, indexed_at, deleted_at, purged_at, search_vector
)
SELECT
    gen_random_uuid(),
    (%(tenants)s::uuid[])[1 + tenant_number],
    CASE WHEN g < %(big_rows)s THEN %(big)s::uuid
         ELSE (%(mailboxes)s::uuid[])[1 + tenant_number * %(per_tenant)s + (g / %(ntenants)s) %% %(per_tenant)s] END,
    'indexed', now(), '', 'smtp', sender || '@sender.example', 'box@bench.example.test',
    CASE WHEN (g / 10) %% 20 = 0 THEN '["promo"]'::jsonb ELSE '[]'::jsonb END,
    NULL, 'sender.example', true, 2000 + (g::bigint * 104729 %% 200000), md5(g::text) || md5(g::text),
    'raw/bench/' || g, 'q' || g, now() - make_interval(secs => (%(total)s - g)::bigint * 31), now(),
    subject, sender || '@sender.example', initcap(sender), '[]'::jsonb, '[]'::jsonb, '[]'::jsonb, '',
    'box@bench.example.test', NULL, '<' || g || '@sender.example>', '', '[]'::jsonb, md5(g::text), '[]'::jsonb,
    body, '', body,
    CASE WHEN (g / 10) %% 10 = 3 THEN jsonb_build_array(lpad((g %% 1000000)::text, 6, '0')) ELSE '[]'::jsonb END,
    '[]'::jsonb, '', '', (g / 10) %% 10 = 5, CASE WHEN (g / 10) %% 10 = 5 THEN 'contract.pdf' ELSE '' END, '[]'::jsonb,
    r < 0.5, now(), now(), NULL, NULL,
    setweight(to_tsvector('simple', subject), 'A')
        || setweight(to_tsvector('simple', initcap(sender) || ' ' || sender || '@sender.example'
           || ' box@bench.example.test'), 'B')
        || setweight(to_tsvector('simple', body || ' '
           || CASE WHEN (g / 10) %% 10 = 5 THEN 'contract.pdf' ELSE '' END), 'C')
FROM rows
"""


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(name: str, repeat: int) -> None:
    django_setup(name)
    from django.test import Client

    from mailboxes.models import Mailbox, Message
    from tenants.access import ALL_PERMISSIONS, Principal
    from tenants.models import Tenant
    from tenants.services import api_key_mint

    total = Message.objects.count()
    tenants = list(Tenant.objects.filter(slug__startswith="bench-").order_by("slug"))
    keys = []
    for tenant in tenants:
        _, secret = api_key_mint(
            principal=Principal.system(tenant), name="bench", permissions=ALL_PERMISSIONS, domains=(), mailboxes=()
        )
        keys.append(secret)
    client = Client()
    print(f"{total:,} messages in {len(tenants)} tenants; {repeat} rounds per query per tenant")

    def timed(path: str, secret: str, params: dict[str, str]) -> tuple[float, dict[str, object]]:
        began = time.perf_counter()
        response = client.get(path, params, HTTP_AUTHORIZATION=f"Bearer {secret}")
        elapsed = (time.perf_counter() - began) * 1000
        assert response.status_code == 200, response.content[:300]
        return elapsed, response.json()

    for secret in keys:  # warm the caches and the connection once
        timed("/api/v1/messages/", secret, {"q": "invoice"})
    every: list[float] = []
    print(f"{'query':<28} {'p50 ms':>8} {'p95 ms':>8} {'hits on page 1':>15}")
    for query in QUERIES:
        samples: list[float] = []
        hits: list[int] = []
        for _ in range(repeat):
            for secret in keys:
                elapsed, body = timed("/api/v1/messages/", secret, {"q": query})
                samples.append(elapsed)
                hits.append(len(body["results"]))  # type: ignore[arg-type]
        every.extend(samples)
        print(
            f"{query:<28} {percentile(samples, 0.5):>8.1f} {percentile(samples, 0.95):>8.1f}"
            f" {statistics.mean(hits):>15.1f}"
        )
    print(f"{'all search queries':<28} {percentile(every, 0.5):>8.1f} {percentile(every, 0.95):>8.1f}")

    big = Mailbox.objects.get(local_part="big")
    rows = Message.objects.filter(mailbox=big).count()
    first: list[float] = []
    deep: list[float] = []
    for _ in range(repeat * 4):
        elapsed, body = timed("/api/v1/messages/", keys[0], {"mailbox": str(big.pk)})
        first.append(elapsed)
    for _ in range(repeat):
        params = {"mailbox": str(big.pk)}
        for _page in range(20):
            elapsed, body = timed("/api/v1/messages/", keys[0], params)
            deep.append(elapsed)
            if not body["next"]:
                break
            cursor = str(body["next"]).split("cursor=")[1].split("&")[0]
            params = {"mailbox": str(big.pk), "cursor": _unquote(cursor)}
    print(
        f"list, mailbox of {rows:,}: first page"
        f" p50 {percentile(first, 0.5):.1f} ms p95 {percentile(first, 0.95):.1f} ms"
    )
    print(
        f"list, mailbox of {rows:,}: pages 1-20 p50 {percentile(deep, 0.5):.1f} ms p95 {percentile(deep, 0.95):.1f} ms"
    )
    print(f"list, all: p95 {percentile(first + deep, 0.95):.1f} ms; load average {os.getloadavg()}")


def _unquote(value: str) -> str:
    from urllib.parse import unquote

    return unquote(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", default="mp_parse2_bench")
    sub = parser.add_subparsers(dest="command", required=True)
    generating = sub.add_parser("generate")
    generating.add_argument("--messages", type=int, default=1_000_000)
    measuring = sub.add_parser("measure")
    measuring.add_argument("--repeat", type=int, default=5)
    sub.add_parser("drop")
    options = parser.parse_args()
    if options.command == "generate":
        generate(options.database, options.messages)
    elif options.command == "measure":
        measure(options.database, options.repeat)
    else:
        admin_execute(f'DROP DATABASE IF EXISTS "{options.database}" WITH (FORCE)')


if __name__ == "__main__":
    main()
