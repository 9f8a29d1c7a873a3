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

At scale (docs/benchmarks.md, "Search at 10,000,000 messages in 50 tenants")::

    bench/search.py --database NAME generate --messages 10000000 --tenants 50 --largest 2000000 \
        --chunk 250000 --workers 2 --texts 50000     # interrupted? the same with --resume

``--largest`` gives tenant 0 that many rows and spreads the rest over the others; ``--texts``
draws subjects and bodies from that many pre-built texts instead of building each row's.

``measure`` times ``GET /api/v1/messages/?q=`` (first page of 50, newest first) for typical
queries in every tenant, and ``GET /api/v1/messages/?mailbox=<big>`` for the first page and
20 pages deep through the cursor, and prints p50/p95 in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
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


def generate(
    name: str,
    messages: int,
    tenants: int = TENANTS,
    largest: int = 0,
    chunk: int = CHUNK,
    workers: int = 1,
    resume: bool = False,
    texts: int = 0,
) -> None:
    """Build the data set; ``largest`` > 0 gives tenant 0 that many rows and spreads the rest.

    Each chunk's INSERT commits with its row in ``bench_progress``, so ``resume`` continues an
    interrupted load with the chunks not yet done (the setup is read back from ``bench_setup``).
    """
    if not resume:
        admin_execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin_execute(f'CREATE DATABASE "{name}"')
    django_setup(name)
    from django.core.management import call_command
    from django.db import connection

    started = time.monotonic()
    if resume:
        with connection.cursor() as cursor:
            cursor.execute("SELECT params, indexes FROM bench_setup")
            params, indexes = (json.loads(value) if isinstance(value, str) else value for value in cursor.fetchone())
            indexes = [tuple(index) for index in indexes]
            cursor.execute("SELECT lo FROM bench_progress")
            done = {row[0] for row in cursor.fetchall()}
        print(f"resuming: {len(done)} chunks already loaded", flush=True)
    else:
        call_command("migrate", verbosity=0)
        params = {**_setup(messages, tenants, largest), "texts": texts}
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'mailboxes_message' "
                "AND indexname NOT LIKE '%%pkey' AND indexdef NOT LIKE 'CREATE UNIQUE%%'"
            )
            indexes = cursor.fetchall()
            for index_name, _ in indexes:
                cursor.execute(f'DROP INDEX "{index_name}"')
            vocabulary = COMMON + [f"w{n}" for n in range(len(COMMON), 2000)]
            cursor.execute("CREATE TABLE bench_words (id int PRIMARY KEY, word text)")
            cursor.executemany("INSERT INTO bench_words VALUES (%s, %s)", list(enumerate(vocabulary, start=1)))
            cursor.execute("CREATE TABLE bench_setup (params jsonb, indexes jsonb)")
            cursor.execute(
                "INSERT INTO bench_setup VALUES (%s::jsonb, %s::jsonb)", [json.dumps(params), json.dumps(indexes)]
            )
            cursor.execute("CREATE TABLE bench_progress (lo int PRIMARY KEY)")
            cursor.execute(
                "CREATE TABLE bench_texts (id int PRIMARY KEY, subject text, body text,"
                " subject_vector tsvector, body_vector tsvector)"
            )
            cursor.execute("CREATE TABLE bench_senders (id int PRIMARY KEY, vector tsvector)")
            if texts:
                texts_started = time.monotonic()
                for statement in TEXTS_SQL.split(";"):
                    cursor.execute(statement, {"texts": texts})
                cursor.execute("ANALYZE bench_texts")
                print(f"{texts:,} texts in {time.monotonic() - texts_started:.1f} s", flush=True)
        done = set()
        print(f"schema and {len(params['mailboxes']) + 1} mailboxes in {time.monotonic() - started:.1f} s", flush=True)
    connection.close()

    load_started = time.monotonic()
    todo = [offset for offset in range(0, messages, chunk) if offset not in done]
    lock = threading.Lock()

    def load() -> None:
        import psycopg

        with psycopg.connect(database_url(name)) as db:
            db.execute("SET synchronous_commit = off")
            db.execute("SET jit = off")
            db.execute("SET work_mem = '256MB'")
            db.commit()
            while True:
                with lock:
                    if not todo:
                        return
                    offset = todo.pop(0)
                upto = min(messages, offset + chunk)
                chunk_started = time.monotonic()
                db.execute(POOLED_SQL if params["texts"] else GENERATE_SQL, {**params, "lo": offset, "hi": upto - 1})
                db.execute("INSERT INTO bench_progress VALUES (%s)", [offset])
                db.commit()
                print(
                    f"  rows {offset:>10,}..{upto - 1:>10,} in {time.monotonic() - chunk_started:.1f} s"
                    f" ({time.monotonic() - load_started:.0f} s since start; load average"
                    f" {os.getloadavg()[0]:.1f}; {_free_gb():.0f} GB free)",
                    flush=True,
                )

    _run(load, workers, todo, lock)
    print(f"inserted {messages:,} rows in {time.monotonic() - load_started:.1f} s", flush=True)
    index_started = time.monotonic()
    # The GIN indexes (the slow builds, one CPU each) first, `workers` builds at a time.
    pending = sorted((definition for _, definition in indexes), key=lambda definition: " USING gin " not in definition)

    def build() -> None:
        import psycopg

        with psycopg.connect(database_url(name), autocommit=True) as db:
            db.execute("SET maintenance_work_mem = '1GB'")
            db.execute("SET max_parallel_maintenance_workers = 2")
            while True:
                with lock:
                    if not pending:
                        return
                    definition = pending.pop(0).replace("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ", 1)
                one = time.monotonic()
                db.execute(definition)
                print(f"  {definition[27:110]} in {time.monotonic() - one:.1f} s", flush=True)

    _run(build, workers, pending, lock)
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE bench_words, bench_setup, bench_progress, bench_texts, bench_senders")
        cursor.execute("VACUUM ANALYZE mailboxes_message")
    print(f"rebuilt {len(indexes)} indexes and analyzed in {time.monotonic() - index_started:.1f} s", flush=True)
    print(f"generate: {time.monotonic() - started:.1f} s in all", flush=True)


def _run(work: Any, workers: int, queue: list[Any], lock: threading.Lock) -> None:
    """``work`` in ``workers`` threads, each taking items off ``queue``; the first failure empties
    the queue (the others stop after their item) and ends the run."""
    failures: list[BaseException] = []

    def guarded() -> None:
        try:
            work()
        except BaseException as error:
            failures.append(error)
            with lock:
                queue.clear()
            raise

    threads = [threading.Thread(target=guarded) for _ in range(max(1, workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"failed ({failures[0]!r}); what finished is kept: run again with --resume")


def _free_gb() -> float:
    return shutil.disk_usage("/").free / 1e9


def _setup(messages: int, ntenants: int, largest: int) -> dict[str, Any]:
    """Tenants, domains and mailboxes (ORM); the parameters of GENERATE_SQL."""
    from mailboxes.models import Mailbox
    from tenants.models import Domain, Tenant

    mailbox_ids: list[str] = []
    tenant_ids: list[str] = []
    big = ""
    for number in range(ntenants):
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
    # Skewed: of every 1,000 rows after the big mailbox's, the first `share` go to tenant 0.
    share = round(1000 * (largest - big_rows) / (messages - big_rows)) if largest else -1
    return {
        "tenants": tenant_ids,
        "mailboxes": mailbox_ids,
        "big": big,
        "big_rows": big_rows,
        "total": messages,
        "per_tenant": MAILBOXES_PER_TENANT,
        "ntenants": ntenants,
        "share": share,
    }


# Tenant of row g: tenant 0 for the first big_rows rows (all in the big mailbox); then g %% ntenants,
# or with a skew (share >= 0) tenant 0 for `share` of every 1,000 rows and the others in turn.
_TENANT_NUMBER = """CASE WHEN g < %(big_rows)s THEN 0
             WHEN %(share)s < 0 THEN g %% %(ntenants)s
             WHEN g %% 1000 < %(share)s THEN 0
             ELSE 1 + (g %% 1000 + g / 1000) %% (%(ntenants)s - 1) END"""

# The INSERT both generators share: every column from the `rows` CTE, the vector given.
_INSERT = """
INSERT INTO mailboxes_message (
    id, tenant_id, mailbox_id, state, state_changed_at, state_reason, source, mail_from, rcpt, tags,
    remote_ip, helo, tls, size, sha256, storage_key, trace_id, received_at, created_at,
    subject, from_address, from_name, "to", cc, reply_to, sender, recipients_text, date, message_id,
    in_reply_to, "references", thread_id, headers, text, html, stripped_text, codes, links,
    authentication_results, received_spf, has_attachments, attachment_names, defects, is_read,
    parsed_at, indexed_at, deleted_at, purged_at, search_vector,
    antivirus_verdict, antivirus_signature, auth_spf, auth_dkim, auth_dmarc, auth_arc, is_sent, imap_deleted
)
SELECT
    gen_random_uuid(),
    (%(tenants)s::uuid[])[1 + tenant_number],
    CASE WHEN g < %(big_rows)s THEN %(big)s::uuid
         WHEN %(share)s < 0
         THEN (%(mailboxes)s::uuid[])[1 + tenant_number * %(per_tenant)s + (g / %(ntenants)s) %% %(per_tenant)s]
         ELSE (%(mailboxes)s::uuid[])[1 + tenant_number * %(per_tenant)s + (g / 1000) %% %(per_tenant)s] END,
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
@VECTOR@,
    '', '', '', '', '', '', false, false
FROM rows
"""


# One row per g: tenant g % 10 (tenant 0 for the first big_rows rows, all in the big mailbox),
# received_at spread over the past year with g increasing with time (tags, attachments and codes
# follow g / 10, so every tenant has its share); words from bench_words
# with a skewed index (floor(2000 * random()^3)), so a few words are very common.
GENERATE_SQL = (
    """
WITH vocabulary AS (SELECT array_agg(word ORDER BY id) AS words FROM bench_words),
rows AS (
    SELECT
        g,
        @TENANT@ AS tenant_number,
        (SELECT string_agg(v.words[1 + floor(2000 * random() ^ 3)::int + 0 * s], ' ')
            FROM generate_series(1, 5) AS s WHERE g IS NOT NULL) AS subject,
        (SELECT string_agg(v.words[1 + floor(2000 * random() ^ 3)::int + 0 * s], ' ')
            FROM generate_series(1, 60) AS s WHERE g IS NOT NULL) AS body,
        'sender' || (g::bigint * 7919 %% 500) AS sender,
        random() AS r
    FROM generate_series(%(lo)s::int, %(hi)s::int) AS g, vocabulary v
)
"""
    + _INSERT.replace(
        "@VECTOR@",
        """    setweight(to_tsvector('simple', subject), 'A')
        || setweight(to_tsvector('simple', initcap(sender) || ' ' || sender || '@sender.example'
           || ' box@bench.example.test'), 'B')
        || setweight(to_tsvector('simple', body || ' '
           || CASE WHEN (g / 10) %% 10 = 5 THEN 'contract.pdf' ELSE '' END), 'C')""",
    )
).replace("@TENANT@", _TENANT_NUMBER)


# With --texts N: subject, body and their vectors come from N pre-generated texts (the same
# distribution as above), message g taking text g * 2654435761 mod N (a bijection over any N
# consecutive g); the sender part of the vector from 500 pre-built ones. Same shape, much
# less CPU per row: the per-row random words and to_tsvector are most of the load time.
TEXTS_SQL = """
WITH vocabulary AS (SELECT array_agg(word ORDER BY id) AS words FROM bench_words),
texts AS (
    SELECT
        g AS id,
        (SELECT string_agg(v.words[1 + floor(2000 * random() ^ 3)::int + 0 * s], ' ')
            FROM generate_series(1, 5) AS s WHERE g IS NOT NULL) AS subject,
        (SELECT string_agg(v.words[1 + floor(2000 * random() ^ 3)::int + 0 * s], ' ')
            FROM generate_series(1, 60) AS s WHERE g IS NOT NULL) AS body
    FROM generate_series(0, %(texts)s - 1) AS g, vocabulary v
)
INSERT INTO bench_texts
SELECT id, subject, body, setweight(to_tsvector('simple', subject), 'A'), setweight(to_tsvector('simple', body), 'C')
FROM texts;
INSERT INTO bench_senders
SELECT n, setweight(to_tsvector('simple', initcap('sender' || n) || ' sender' || n || '@sender.example'
    || ' box@bench.example.test'), 'B')
FROM generate_series(0, 499) AS n
"""

POOLED_SQL = (
    """
WITH rows AS (
    SELECT
        g,
        @TENANT@ AS tenant_number,
        t.subject, t.body, t.subject_vector, t.body_vector, b.vector AS sender_vector,
        'sender' || (g::bigint * 7919 %% 500) AS sender,
        random() AS r
    FROM generate_series(%(lo)s::int, %(hi)s::int) AS g
    JOIN bench_texts t ON t.id = g::bigint * 2654435761 %% %(texts)s
    JOIN bench_senders b ON b.id = g::bigint * 7919 %% 500
)
"""
    + _INSERT.replace(
        "@VECTOR@",
        """    subject_vector || sender_vector || body_vector
        || CASE WHEN (g / 10) %% 10 = 5 THEN setweight(to_tsvector('simple', 'contract.pdf'), 'C')
           ELSE ''::tsvector END""",
    )
).replace("@TENANT@", _TENANT_NUMBER)


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(name: str, repeat: int, sample: int = 10, queries: list[str] | None = None) -> None:
    """p50/p95 per query shape over ``sample`` tenants (tenant 0, the largest, always among them)
    and on the largest tenant alone (4 x ``repeat`` rounds there), then list latency and sizes."""
    django_setup(name)
    from django.db import connection
    from django.db.models import Count
    from django.test import Client

    from mailboxes.models import Mailbox, Message
    from tenants.access import ALL_PERMISSIONS, Principal
    from tenants.models import Tenant
    from tenants.services import api_key_mint

    total = Message.objects.count()
    every_tenant = sorted(Tenant.objects.filter(slug__startswith="bench-"), key=lambda tenant: int(tenant.slug[6:]))
    step = max(1, len(every_tenant) // max(1, sample))
    tenants = every_tenant[::step][:sample]
    counts = dict(
        Message.objects.filter(tenant__in=tenants)
        .values_list("tenant")
        .annotate(n=Count("id"))
        .values_list("tenant", "n")
    )
    largest = max(tenants, key=lambda tenant: counts.get(tenant.pk, 0))
    keys: dict[str, str] = {}
    for tenant in tenants:
        _, secret = api_key_mint(
            principal=Principal.system(tenant), name="bench", permissions=ALL_PERMISSIONS, domains=(), mailboxes=()
        )
        keys[str(tenant.pk)] = secret
    client = Client()
    print(
        f"{total:,} messages in {len(every_tenant)} tenants; sampled {len(tenants)} tenants"
        f" ({', '.join(f'{tenant.slug}: {counts.get(tenant.pk, 0):,}' for tenant in tenants)});"
        f" {repeat} rounds per query per tenant, {repeat * 4} on the largest ({largest.slug})"
    )

    def timed(path: str, secret: str, params: dict[str, str]) -> tuple[float, dict[str, object]]:
        began = time.perf_counter()
        response = client.get(path, params, HTTP_AUTHORIZATION=f"Bearer {secret}")
        elapsed = (time.perf_counter() - began) * 1000
        assert response.status_code == 200, response.content[:300]
        return elapsed, response.json()

    for secret in keys.values():  # warm the caches and the connection once
        timed("/api/v1/messages/", secret, {"q": "invoice"})
    big_key = keys[str(largest.pk)]
    every: list[float] = []
    every_largest: list[float] = []
    print(f"{'query':<28} {'p50 ms':>8} {'p95 ms':>8} {'largest p50':>12} {'largest p95':>12} {'hits p1':>8}")
    for query in QUERIES if queries is None else queries:
        samples: list[float] = []
        on_largest: list[float] = []
        hits: list[int] = []
        for _ in range(repeat):
            for secret in keys.values():
                elapsed, body = timed("/api/v1/messages/", secret, {"q": query})
                samples.append(elapsed)
                hits.append(len(body["results"]))  # type: ignore[arg-type]
        for _ in range(repeat * 4):
            elapsed, body = timed("/api/v1/messages/", big_key, {"q": query})
            on_largest.append(elapsed)
        every.extend(samples)
        every_largest.extend(on_largest)
        print(
            f"{query:<28} {percentile(samples, 0.5):>8.1f} {percentile(samples, 0.95):>8.1f}"
            f" {percentile(on_largest, 0.5):>12.1f} {percentile(on_largest, 0.95):>12.1f}"
            f" {statistics.mean(hits):>8.1f}",
            flush=True,
        )
    if every:
        print(
            f"{'all search queries':<28} {percentile(every, 0.5):>8.1f} {percentile(every, 0.95):>8.1f}"
            f" {percentile(every_largest, 0.5):>12.1f} {percentile(every_largest, 0.95):>12.1f}"
        )

    boxes = [Mailbox.objects.get(local_part="big"), Mailbox.objects.get(tenant=largest, local_part="box0")]
    listed: list[float] = []
    for box in boxes:
        rows = Message.objects.filter(mailbox=box).count()
        first: list[float] = []
        deep: list[float] = []
        for _ in range(repeat * 4):
            elapsed, body = timed("/api/v1/messages/", big_key, {"mailbox": str(box.pk)})
            first.append(elapsed)
        for _ in range(repeat):
            params = {"mailbox": str(box.pk)}
            for _page in range(20):
                elapsed, body = timed("/api/v1/messages/", big_key, params)
                deep.append(elapsed)
                if not body["next"]:
                    break
                after = str(body["next"]).split("cursor=")[1].split("&")[0]
                params = {"mailbox": str(box.pk), "cursor": _unquote(after)}
        listed.extend(first + deep)
        print(
            f"list, mailbox {box.local_part} of {rows:,}: first page"
            f" p50 {percentile(first, 0.5):.1f} ms p95 {percentile(first, 0.95):.1f} ms;"
            f" pages 1-20 p50 {percentile(deep, 0.5):.1f} ms p95 {percentile(deep, 0.95):.1f} ms"
        )
    whole = [timed("/api/v1/messages/", big_key, {})[0] for _ in range(repeat * 4)]
    print(
        f"list, the whole largest tenant ({counts.get(largest.pk, 0):,}), first page:"
        f" p50 {percentile(whole, 0.5):.1f} ms p95 {percentile(whole, 0.95):.1f} ms"
    )
    print(f"list, all: p50 {percentile(listed, 0.5):.1f} ms p95 {percentile(listed, 0.95):.1f} ms")
    print(f"load average {os.getloadavg()}")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_database_size(current_database()), pg_table_size('mailboxes_message'),"
            " pg_indexes_size('mailboxes_message')"
        )
        database, table, indexes = cursor.fetchone()
        cursor.execute(
            "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index"
            " WHERE indrelid = 'mailboxes_message'::regclass ORDER BY 2 DESC"
        )
        each = cursor.fetchall()
    millions = total / 1e6
    print(
        f"sizes: database {database / 2**30:.2f} GiB ({database / 2**30 / millions:.2f} GiB a million messages);"
        f" mailboxes_message table with TOAST {table / 2**30:.2f} GiB ({table / 2**30 / millions:.2f} a million),"
        f" its indexes {indexes / 2**30:.2f} GiB ({indexes / 2**30 / millions:.2f} a million)"
    )
    for index_name, size in each:
        print(f"  {index_name:<40} {size / 2**20:>10.0f} MiB ({size / 2**20 / millions:.0f} MiB a million)")


def _unquote(value: str) -> str:
    from urllib.parse import unquote

    return unquote(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", default="mp_parse2_bench")
    sub = parser.add_subparsers(dest="command", required=True)
    generating = sub.add_parser("generate")
    generating.add_argument("--messages", type=int, default=1_000_000)
    generating.add_argument("--tenants", type=int, default=TENANTS)
    generating.add_argument("--largest", type=int, default=0, help="rows in tenant 0 (default: an even spread)")
    generating.add_argument("--chunk", type=int, default=CHUNK, help="rows per INSERT statement")
    generating.add_argument("--workers", type=int, default=1, help="concurrent INSERT connections")
    generating.add_argument("--resume", action="store_true", help="continue an interrupted load")
    generating.add_argument(
        "--texts",
        type=int,
        default=0,
        help="draw subjects and bodies from this many pre-built texts (default: per row)",
    )
    measuring = sub.add_parser("measure")
    measuring.add_argument("--repeat", type=int, default=5)
    measuring.add_argument("--sample", type=int, default=10, help="tenants to time (the largest always among them)")
    measuring.add_argument("--queries", nargs="*", help="the query shapes to time (default: all; none: lists only)")
    sub.add_parser("drop")
    options = parser.parse_args()
    if options.command == "generate":
        generate(
            options.database,
            options.messages,
            options.tenants,
            options.largest,
            options.chunk,
            options.workers,
            options.resume,
            options.texts,
        )
    elif options.command == "measure":
        measure(options.database, options.repeat, options.sample, options.queries)
    else:
        admin_execute(f'DROP DATABASE IF EXISTS "{options.database}" WITH (FORCE)')


if __name__ == "__main__":
    main()
