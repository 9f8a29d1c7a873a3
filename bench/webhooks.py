"""Webhook benchmark.

Part 1, delivery throughput (target >= 300 deliveries/s per worker process): N events are
recorded for a tenant with one endpoint pointing at a local receiver while no worker runs, so
their deliveries wait in the broker (one task each, enqueued after commit, as in production).
Then ONE Celery worker process (thread pool) starts and drains them; the rate is counted from
the receiver's first request to its last, so worker start-up is excluded. Every 25th request
is verified with the official ``standardwebhooks`` package, and all ids must arrive.

Part 2, end-to-end latency from the SMTP 250 to the receiver getting ``indexer.indexed`` at a
steady 100 msg/s (target p95 < 1 s): ``runsmtp`` (with its drainer), one worker for the
ingest/parse/index queues, one for webhooks; 8 SMTP connections send on a fixed schedule, the
250's queue id is matched to the ``ingest.received`` webhook's message id, then to that
message's ``indexer.indexed`` webhook.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/mp_bench_webhooks \\
    CELERY_BROKER_URL=redis://127.0.0.1:6379/12 DATA_DIR=var/bench-webhooks \\
    .venv/bin/python bench/webhooks.py --count 3000 --threads 12 --rate 100 --seconds 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/mp_bench_webhooks")
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/12")
os.environ.setdefault("DATA_DIR", str(ROOT / "var" / "bench-webhooks"))
os.environ["WEBHOOK_ALLOW_PRIVATE"] = "true"  # the receiver is on loopback
os.environ.setdefault("LOG_LEVEL", "WARNING")
os.environ.setdefault("LOG_FORMAT", "text")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailplatform.settings")


def fresh_database(url: str) -> None:
    """A new, empty database for each run: rows and dead tuples of earlier runs (where
    autovacuum is off, as on the development machine) would make runs incomparable."""
    if not url.startswith("postgres"):
        return
    import psycopg

    base, _, name = url.rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


class Receiver:
    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.samples: list[tuple[bytes, dict[str, str]]] = []
        self.first: float | None = None
        self.last: float = 0.0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                now = time.monotonic()
                with receiver.lock:
                    if receiver.first is None:
                        receiver.first = now
                    receiver.last = now
                    receiver.ids.add(self.headers["webhook-id"])
                    if len(receiver.ids) % 25 == 0:
                        receiver.samples.append((body, {k.lower(): v for k, v in self.headers.items()}))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def throughput(count: int, threads: int) -> dict[str, Any]:
    from django.db import transaction
    from standardwebhooks.webhooks import Webhook

    from audit.services import event_record
    from mailplatform.celery import app
    from tenants.access import Principal
    from tenants.models import Tenant
    from webhooks.models import Delivery
    from webhooks.services import endpoint_create

    app.control.purge()
    receiver = Receiver()
    tenant = Tenant.objects.create(name="bench", slug=f"bench-{int(time.time() * 1000)}")
    _, secret = endpoint_create(principal=Principal.system(tenant), url=f"http://127.0.0.1:{receiver.port}/hook")
    started = time.monotonic()
    for offset in range(0, count, 500):
        with transaction.atomic():
            for index in range(offset, min(offset + 500, count)):
                event_record(tenant_id=tenant.pk, type="ingest.received", data={"n": index})
    record_seconds = time.monotonic() - started

    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "mailplatform", "worker", "-Q", "webhooks", "-P", "threads",
         "-c", str(threads), "--without-gossip", "--without-mingle", "--without-heartbeat",
         "-l", os.environ.get("BENCH_WORKER_LOG", "warning")],
        cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + max(120, count / 20)
        while len(receiver.ids) < count and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        receiver.server.shutdown()
    verifier = Webhook(secret)
    for body, headers in receiver.samples:
        verifier.verify(body, headers)
    received = len(receiver.ids)
    seconds = (receiver.last - receiver.first) if receiver.first is not None else float("nan")
    delivered = Delivery.objects.filter(tenant=tenant, state=Delivery.State.DELIVERED).count()
    return {
        "events": count,
        "received_distinct": received,
        "delivered_in_db": delivered,
        "verified_samples": len(receiver.samples),
        "worker_threads": threads,
        "seconds": round(seconds, 3),
        "deliveries_per_second": round(received / seconds, 1) if seconds and seconds == seconds else None,
        "record_events_per_second": round(count / record_seconds, 1),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))] if ordered else float("nan")


class EventReceiver(Receiver):
    """Records, per event type, the arrival time and data of each webhook."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: dict[str, dict[str, tuple[float, dict[str, Any]]]] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                now = time.time()
                with receiver.lock:
                    data = {**body["data"], "_recorded": body["timestamp"]}
                    receiver.arrivals.setdefault(body["type"], {}).setdefault(body["id"], (now, data))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server.shutdown()
        self.server.server_close()

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def push_latency(rate: int, seconds: float, threads: int) -> dict[str, Any]:
    """The webhooks' own leg: from an event's commit to the receiver, at ``rate`` events/s.

    One event per transaction, as ingest records them; one webhooks worker process.
    """
    from django.db import transaction

    from audit.services import event_record
    from mailplatform.celery import app
    from tenants.access import Principal
    from tenants.models import Tenant
    from webhooks.services import endpoint_create

    app.control.purge()
    receiver = EventReceiver()
    tenant = Tenant.objects.create(name="bench push", slug=f"bench-push-{int(time.time() * 1000)}")
    endpoint_create(principal=Principal.system(tenant), url=f"http://127.0.0.1:{receiver.port}/hook")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "mailplatform", "worker", "-Q", "webhooks", "-P", "threads",
         "-c", str(threads), "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"],
        cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    committed: dict[str, float] = {}
    try:
        time.sleep(6)  # worker up
        total = int(rate * seconds)
        begin = time.monotonic()
        for number in range(total):
            pause = begin + number / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            with transaction.atomic():
                event = event_record(tenant_id=tenant.pk, type="ingest.received", data={"n": number})
            committed[event.public_id] = time.time()
        achieved = total / (time.monotonic() - begin)
        deadline = time.monotonic() + 60
        while len(receiver.arrivals.get("ingest.received", {})) < total and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        receiver.server.shutdown()
    arrivals = receiver.arrivals.get("ingest.received", {})
    latencies = [arrivals[key][0] - at for key, at in committed.items() if key in arrivals]
    return {
        "rate": rate,
        "achieved_rate": round(achieved, 1),
        "events": len(committed),
        "received": len(latencies),
        "p50_seconds": round(_percentile(latencies, 0.5), 3),
        "p95_seconds": round(_percentile(latencies, 0.95), 3),
        "max_seconds": round(max(latencies), 3) if latencies else None,
    }


def end_to_end(rate: int, seconds: float, worker_threads: int) -> dict[str, Any]:
    """A steady ``rate`` msg/s SMTP stream; from each 250 to its ``indexer.indexed`` webhook."""
    import smtplib
    from email.message import EmailMessage

    from django.conf import settings

    from mailboxes.models import Mailbox
    from mailplatform.celery import app
    from tenants.access import Principal
    from tenants.models import Domain, Tenant
    from webhooks.services import endpoint_create

    app.control.purge()
    stamp = int(time.time() * 1000)
    tenant = Tenant.objects.create(name="bench e2e", slug=f"bench-e2e-{stamp}")
    domain = Domain.objects.create(tenant=tenant, name=f"e2e{stamp}.bench.test", state=Domain.State.VERIFIED)
    address = f"inbox@{domain.name}"
    mailbox = Mailbox.objects.create(tenant=tenant, domain=domain, local_part="inbox", address=address)
    receiver = EventReceiver()
    endpoint_create(
        principal=Principal.system(tenant),
        url=f"http://127.0.0.1:{receiver.port}/hook",
        event_types=["ingest.received", "indexer.indexed"],
    )
    del mailbox
    port = _free_port()
    env = {
        **os.environ,
        "INGEST_RATE_PER_IP": "0",
        "INGEST_RATE_PER_TENANT": "0",
        "INGEST_MAX_CONNECTIONS_PER_IP": "0",
        "INGEST_SPOOL_LOW_WATER": "0",
        "INGEST_METRICS_PORT": "0",
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "manage.py", "runsmtp", "--port", str(port), "--metrics-port", "0"],
            cwd=ROOT, env=env, start_new_session=True,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "mailplatform", "worker", "-Q", "ingest,parse,index",
             "-P", "threads", "-c", "8", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-l", "warning", "-n", f"pipeline-{stamp}@%h"],
            cwd=ROOT, env=env, start_new_session=True,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "mailplatform", "worker", "-Q", "webhooks",
             "-P", "threads", "-c", str(worker_threads), "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-l", "warning", "-n", f"webhooks-{stamp}@%h"],
            cwd=ROOT, env=env, start_new_session=True,
        ),
    ]  # fmt: skip
    accepted: dict[str, float] = {}  # queue id -> time of the 250
    errors: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=5) as probe:
                    probe.noop()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        time.sleep(3)  # workers up
        total = int(rate * seconds)
        connections = 8
        lock = threading.Lock()
        begin = time.monotonic() + 0.5

        def sender(index: int) -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                smtp.ehlo("bench.example.org")
                for number in range(index, total, connections):
                    pause = begin + number / rate - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    message = EmailMessage()
                    message["From"] = "sender@example.org"
                    message["To"] = address
                    message["Subject"] = f"bench {number} code 123456"
                    message.set_content(f"Hello {number}. Your code is 123456.\n")
                    smtp.mail("sender@example.org")
                    smtp.rcpt(address)
                    code, reply = smtp.data(message.as_bytes())
                    at = time.time()
                    text = reply.decode(errors="replace")
                    if code != 250:
                        with lock:
                            errors.append(f"{code} {text}")
                        continue
                    queue_id = text.rsplit(" ", 1)[-1]
                    with lock:
                        accepted[queue_id] = at

        threads = [threading.Thread(target=sender, args=(index,)) for index in range(connections)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sent_seconds = time.monotonic() - begin
        wait_until = time.monotonic() + 60
        while time.monotonic() < wait_until:
            with receiver.lock:
                indexed = len(receiver.arrivals.get("indexer.indexed", {}))
            if indexed >= len(accepted):
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        receiver.server.shutdown()
    message_by_queue = {
        data.get("queue_id"): data.get("message") for _, data in receiver.arrivals.get("ingest.received", {}).values()
    }
    indexed_at = {data.get("message"): at for at, data in receiver.arrivals.get("indexer.indexed", {}).values()}
    latencies = [
        indexed_at[message_by_queue[queue_id]] - at
        for queue_id, at in accepted.items()
        if message_by_queue.get(queue_id) in indexed_at
    ]
    # The webhooks' own share: from the moment an event is recorded to its arrival.
    from datetime import datetime

    push = [
        at - datetime.fromisoformat(data["_recorded"].replace("Z", "+00:00")).timestamp()
        for arrivals in receiver.arrivals.values()
        for at, data in arrivals.values()
    ]
    del settings
    return {
        "ran": True,
        "rate": rate,
        "sent": int(rate * seconds),
        "accepted_250": len(accepted),
        "smtp_errors": len(errors),
        "send_seconds": round(sent_seconds, 2),
        "indexed_webhooks_matched": len(latencies),
        "p50_seconds": round(_percentile(latencies, 0.5), 3),
        "p95_seconds": round(_percentile(latencies, 0.95), 3),
        "max_seconds": round(max(latencies), 3) if latencies else None,
        "event_to_webhook_p50_seconds": round(_percentile(push, 0.5), 3),
        "event_to_webhook_p95_seconds": round(_percentile(push, 0.95), 3),
    }


def parser_reference(count: int = 500) -> float:
    """The issue's same-run reference: mail-parser alone (``mailparser.parse_from_bytes``) on
    messages shaped like the end-to-end ones, msg/s per CPU-second (best of three passes)."""
    from email.message import EmailMessage

    import mailparser

    raws = []
    for number in range(count):
        message = EmailMessage()
        message["From"] = "sender@example.org"
        message["To"] = "inbox@e2e.bench.test"
        message["Subject"] = f"bench {number} code 123456"
        message.set_content(f"Hello {number}. Your code is 123456.\n")
        raws.append(message.as_bytes())
    best = 0.0
    for _ in range(3):
        started = time.process_time()
        for raw in raws:
            mailparser.parse_from_bytes(raw)
        best = max(best, count / max(time.process_time() - started, 1e-9))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=12, help="task threads of the one webhooks worker process")
    parser.add_argument("--rate", type=int, default=100, help="end-to-end: messages per second")
    parser.add_argument("--seconds", type=float, default=10, help="end-to-end: how long to send")
    parser.add_argument("--skip", choices=["throughput", "push", "end-to-end"], action="append", default=[])
    arguments = parser.parse_args()
    fresh_database(os.environ["DATABASE_URL"])

    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    report: dict[str, Any] = {}
    if "throughput" not in arguments.skip:
        result = throughput(arguments.count, arguments.threads)
        report["throughput"] = result
        rate = result["deliveries_per_second"] or 0
        print(
            f"delivery throughput: {result['received_distinct']}/{result['events']} delivered in "
            f"{result['seconds']} s by 1 worker process ({result['worker_threads']} task threads): "
            f"{rate} deliveries/s (target >= 300: {'MET' if rate >= 300 else 'NOT MET'})"
        )
    if "push" not in arguments.skip:
        push = push_latency(arguments.rate * 2, arguments.seconds, arguments.threads)
        report["push"] = push
        print(
            f"webhook leg, event commit -> receiver at {push['rate']} events/s (achieved {push['achieved_rate']}): "
            f"{push['received']}/{push['events']} received, p50 {push['p50_seconds']} s, "
            f"p95 {push['p95_seconds']} s, max {push['max_seconds']} s"
        )
    if "end-to-end" not in arguments.skip:
        e2e = end_to_end(arguments.rate, arguments.seconds, arguments.threads)
        report["end_to_end"] = e2e
        p95 = e2e["p95_seconds"]
        print(
            f"end-to-end SMTP 250 -> indexer.indexed webhook at {e2e['rate']} msg/s: "
            f"{e2e['indexed_webhooks_matched']}/{e2e['accepted_250']} matched, p50 {e2e['p50_seconds']} s, "
            f"p95 {p95} s, max {e2e['max_seconds']} s (target p95 < 1 s: {'MET' if p95 < 1 else 'NOT MET'})"
        )
        print(
            f"  of which event recorded -> webhook received: p50 {e2e['event_to_webhook_p50_seconds']} s, "
            f"p95 {e2e['event_to_webhook_p95_seconds']} s"
        )
        reference = e2e["reference_per_cpu_second"] = round(parser_reference(), 1)
        print(
            f"  reference, mail-parser alone on messages of this shape: {reference} msg/s per CPU-second"
            f" (one third: {reference / 3:.0f} msg/s); load average {os.getloadavg()}"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
