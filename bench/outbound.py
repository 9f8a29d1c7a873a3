"""Outbound benchmark: accepting sends (API and SMTP submission) and delivering them signed.

Targets (issue 17): >= 300 messages/s accepted, >= 200 delivered and DKIM-signed per second
sustained, p95 accept latency < 50 ms, with 10 KiB messages through the smarthost path.

Phase 1, accept: uvicorn (``--web-workers`` processes) takes ``--api`` JSON sends of 10 KiB
from ``--threads`` keep-alive connections, then ``runsmtp --submission`` takes ``--smtp``
messages over ``--smtp-connections`` sessions (STARTTLS and AUTH once per session). No worker
runs yet: each answer means the message and its recipient are committed, nothing more.
Phase 2, deliver: a Celery worker on the ``outbound`` queue, prefork with
``--worker-processes`` children as ``make run`` and compose run it (or one process with a
thread pool of ``--worker-threads``, when given), signs every message with the domain's RSA
2048 key and hands it to Postfix (the smarthost), which relays to an aiosmtpd sink. The rate
runs from the worker's start to the sink's last arrival; every 25th message is verified there
with dkimpy.

``--py-spy DIR`` records each phase's server with py-spy (raw collapsed stacks, idle threads
left out, child processes included): ``DIR/api.txt`` (uvicorn), ``DIR/smtp.txt`` (runsmtp
--submission), ``DIR/deliver.txt`` (the worker), and prints where each spent its samples.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/mp_bench_outbound \\
    CELERY_BROKER_URL=redis://127.0.0.1:6379/13 DATA_DIR=var/bench-outbound \\
    .venv/bin/python bench/outbound.py --api 2000 --smtp 1000
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/mp_bench_outbound")
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/13")
os.environ.setdefault("DATA_DIR", str(ROOT / "var" / "bench-outbound"))
os.environ.setdefault("LOG_LEVEL", "WARNING")
os.environ.setdefault("LOG_FORMAT", "text")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailplatform.settings")
os.environ["OUTBOUND_RATE_PER_TENANT"] = "10000000"
os.environ["OUTBOUND_DAILY_QUOTA"] = "10000000"
os.environ.setdefault("OUTBOUND_BOUNCE_DOMAIN", "bounces.bench.test")

BODY = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 180)[: 10 * 1024]
# SMTP lines stay within 998 characters (RFC 5322 section 2.1.1): 76 a line, as mail clients do.
BODY_LINES = "\r\n".join(BODY[start : start + 76] for start in range(0, len(BODY), 76))


class Profiler:
    """``py-spy record`` on one process tree for as long as a phase lasts (SIGINT writes it)."""

    def __init__(self, folder: str, name: str, pid: int) -> None:
        self.path = Path(folder) / f"{name}.txt"
        self.process: subprocess.Popen[bytes] | None = None
        if folder:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.process = subprocess.Popen(
                [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--subprocesses",
                 "--format", "raw", "--nolineno", "--nonblocking", "--rate", "100", "--output", str(self.path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.5)  # attached before the phase starts

    def stop(self) -> list[str]:
        if self.process is None:
            return []
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        return stack_shares(self.path) if self.path.exists() else []


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its live children so far: what a phase costs
    its server, which the shared machine's load does not inflate as it does wall-clock rates."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def stack_shares(path: Path, top: int = 30) -> list[str]:
    """Where the samples went: each function's share as the innermost frame (self) and on the
    stack at all (total), highest total first, the process and thread frames left out."""
    own: dict[str, int] = {}
    anywhere: dict[str, int] = {}
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        frames = [frame for frame in stack.split(";") if not frame.startswith(("process ", "thread "))]
        if not frames:
            continue
        count = int(number)
        samples += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            anywhere[frame] = anywhere.get(frame, 0) + count
    ranked = sorted(anywhere, key=lambda frame: -anywhere[frame])[:top]
    lines = [f"{samples} samples; total %, self %, function"]
    lines += [f"{anywhere[f] * 100 / samples:5.1f} {own.get(f, 0) * 100 / samples:5.1f}  {f}" for f in ranked]
    by_self = sorted(own, key=lambda frame: -own[frame])[:top]
    lines += ["highest self:"] + [f"{own[f] * 100 / samples:5.1f}  {f}" for f in by_self]
    return lines


def fresh_database(url: str) -> None:
    import psycopg

    base, _, name = url.rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def setup() -> dict[str, Any]:
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from mailboxes.models import Mailbox
    from outbound.models import DkimKey
    from outbound.services import dkim_key_create
    from tenants.access import ALL_PERMISSIONS, Principal
    from tenants.models import Domain, Tenant
    from tenants.services import api_key_mint

    tenant = Tenant.objects.create(name="bench", slug="bench")
    domain = Domain.objects.create(tenant=tenant, name="bench.example.test", state=Domain.State.VERIFIED)
    Mailbox.objects.create(tenant=tenant, domain=domain, local_part="sender")
    principal = Principal.system(tenant)
    key = dkim_key_create(principal=principal, domain=domain, algorithm="rsa")
    DkimKey.objects.filter(pk=key.pk).update(state=DkimKey.State.ACTIVE, published=True)
    _, secret = api_key_mint(principal=principal, name="bench", permissions=ALL_PERMISSIONS)
    return {"secret": secret, "record": key.record_value}


def accept_api(url: str, secret: str, count: int, threads: int) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    per_thread = [count // threads + (1 if index < count % threads else 0) for index in range(threads)]

    def run(n: int, offset: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
        for index in range(n):
            body = json.dumps(
                {"from": "sender@bench.example.test", "to": [f"r{offset + index}@remote.example.org"],
                 "subject": f"bench {offset + index}", "text": BODY}
            )  # fmt: skip
            started = time.perf_counter()
            conn.request("POST", "/api/v1/messages/send", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                if response.status != 202:
                    failures.append(str(response.status))
        conn.close()

    workers, offset = [], 0
    started = time.perf_counter()
    for n in per_thread:
        workers.append(threading.Thread(target=run, args=(n, offset)))
        offset += n
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started
    return {
        "messages": count,
        "failures": len(failures),
        "seconds": round(seconds, 2),
        "accepted_per_second": round((count - len(failures)) / seconds, 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p95_ms": round(percentile(latencies, 0.95) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "load_average": os.getloadavg()[0],
    }


def accept_smtp(port: int, secret: str, count: int, connections: int) -> dict[str, Any]:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def run(n: int, offset: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.starttls(context=context)
            client.login("bench", secret)
            for index in range(n):
                rcpt = f"s{offset + index}@remote.example.org"
                headers = f"From: sender@bench.example.test\r\nTo: {rcpt}\r\nSubject: smtp {offset + index}\r\n"
                message = f"{headers}\r\n{BODY_LINES}\r\n".encode()
                started = time.perf_counter()
                try:
                    client.sendmail("sender@bench.example.test", [rcpt], message)
                except smtplib.SMTPException as exc:
                    with lock:
                        failures.append(str(exc)[:100])
                with lock:
                    latencies.append(time.perf_counter() - started)

    per = [count // connections + (1 if index < count % connections else 0) for index in range(connections)]
    threads, offset = [], 0
    started = time.perf_counter()
    for n in per:
        threads.append(threading.Thread(target=run, args=(n, offset)))
        offset += n
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return {
        "messages": count,
        "failures": len(failures),
        "seconds": round(seconds, 2),
        "accepted_per_second": round((count - len(failures)) / seconds, 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p95_ms": round(percentile(latencies, 0.95) * 1000, 1),
        "first_failure": failures[0] if failures else None,
        "load_average": os.getloadavg()[0],
    }


def postfix_reference(port: int, sink: Any, count: int, connections: int) -> dict[str, Any]:
    """The same-run reference: a bare smtplib loop straight to Postfix (no database, no
    signing), ``connections`` persistent sessions, timed until the sink has everything."""
    message = f"From: sender@bench.example.test\r\nTo: ref@remote.example.org\r\nSubject: ref\r\n\r\n{BODY_LINES}\r\n"
    before = len(sink.handler.received)
    cpu = time.process_time()

    def run(n: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            for _ in range(n):
                client.sendmail("bounces@bounces.bench.test", ["ref@remote.example.org"], message.encode())

    per = [count // connections + (1 if index < count % connections else 0) for index in range(connections)]
    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(n,)) for n in per]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    handed = time.perf_counter() - started
    deadline = time.monotonic() + 120
    while len(sink.handler.received) - before < count and time.monotonic() < deadline:
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    return {
        "messages": count,
        "at_sink": len(sink.handler.received) - before,
        "accepted_by_postfix_per_second": round(count / handed, 1),
        "at_sink_per_second": round((len(sink.handler.received) - before) / seconds, 1),
        "client_cpu_seconds": round(time.process_time() - cpu, 2),
        "load_average": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", type=int, default=2000)
    parser.add_argument("--smtp", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=16, help="API client connections")
    parser.add_argument("--smtp-connections", type=int, default=8)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--worker-processes", type=int, default=2, help="prefork children of the worker")
    parser.add_argument("--worker-threads", type=int, default=0, help="a thread pool of this size instead")
    parser.add_argument("--reference", type=int, default=600, help="messages of the bare smtplib loop to Postfix")
    parser.add_argument("--py-spy", default="", metavar="DIR", help="record each phase's server with py-spy")
    options = parser.parse_args()

    fresh_database(os.environ["DATABASE_URL"])
    import django

    django.setup()
    import dkim

    from mailplatform.testing import free_port, wait_for_port
    from outbound.models import Recipient
    from outbound.tests.harness import Postfix, Sink

    prepared = setup()
    env = dict(os.environ)
    sink = Sink()
    postfix_root = Path(tempfile.mkdtemp(prefix="mp-bench-postfix-"))
    postfix_root.chmod(0o755)
    postfix = Postfix(postfix_root, relay_port=sink.port, bounce_domain="bounces.bench.test", bounce_port=free_port())
    env["OUTBOUND_URL"] = f"smtp://127.0.0.1:{postfix.port}"
    web_port, submission_port = free_port(), free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "mailplatform.asgi:application", "--port", str(web_port),
             "--workers", str(options.web_workers), "--lifespan", "off", "--no-proxy-headers",
             "--log-level", "warning"],
            cwd=ROOT, env=env, start_new_session=True,
        ),
        subprocess.Popen(
            [sys.executable, "manage.py", "runsmtp", "--submission", "--port", str(submission_port)],
            cwd=ROOT, env=env, start_new_session=True,
        ),
    ]  # fmt: skip
    results: dict[str, Any] = {}
    profiles: dict[str, list[str]] = {}
    try:
        wait_for_port("127.0.0.1", web_port, timeout=60)
        wait_for_port("127.0.0.1", submission_port, timeout=60)
        time.sleep(2)  # every web worker up
        profiler = Profiler(options.py_spy, "api", processes[0].pid)
        cpu = tree_cpu_seconds(processes[0].pid)
        results["accept_api"] = accept_api(
            f"http://127.0.0.1:{web_port}", prepared["secret"], options.api, options.threads
        )
        results["accept_api"]["server_cpu_ms_per_message"] = round(
            (tree_cpu_seconds(processes[0].pid) - cpu) * 1000 / options.api, 2
        )
        profiles["api"] = profiler.stop()
        profiler = Profiler(options.py_spy, "smtp", processes[1].pid)
        cpu = tree_cpu_seconds(processes[1].pid)
        results["accept_smtp"] = accept_smtp(
            submission_port, prepared["secret"], options.smtp, options.smtp_connections
        )
        results["accept_smtp"]["server_cpu_ms_per_message"] = round(
            (tree_cpu_seconds(processes[1].pid) - cpu) * 1000 / options.smtp, 2
        )
        profiles["smtp"] = profiler.stop()
        total = Recipient.objects.filter(state="queued").count()
        started = time.perf_counter()
        pool = ["-P", "threads", "-c", str(options.worker_threads)] if options.worker_threads else [
            "-P", "prefork", "-c", str(options.worker_processes)]  # fmt: skip
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "mailplatform", "worker", "-Q", "outbound", *pool,
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"],
            cwd=ROOT, env=env, start_new_session=True,
        )  # fmt: skip
        processes.append(worker)
        profiler = Profiler(options.py_spy, "deliver", worker.pid)
        deadline = time.monotonic() + max(120, total / 5)
        first: tuple[float, float, int] | None = None  # when delivery began: time, worker CPU, at sink
        while len(sink.handler.received) < total and time.monotonic() < deadline:
            if first is None and sink.handler.received:
                first = (time.perf_counter(), tree_cpu_seconds(worker.pid), len(sink.handler.received))
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        # Steady state: from the first arrival at the sink to the last (the worker's boot left out).
        first = first or (started, 0.0, 0)
        steady_seconds = time.perf_counter() - first[0]
        steady_messages = len(sink.handler.received) - first[2]
        steady_cpu = tree_cpu_seconds(worker.pid) - first[1]
        profiles["deliver"] = profiler.stop()
        received = list(sink.handler.received)
        record = prepared["record"].encode()
        samples = received[::25]
        verified = sum(bool(dkim.verify(item.content, dnsfunc=lambda name, timeout=5: record)) for item in samples)
        delivered = Recipient.objects.filter(state="delivered").count()
        results["deliver"] = {
            "queued": total,
            "at_sink": len(received),
            "delivered_in_db": delivered,
            "seconds_worker_start_to_last_at_sink": round(seconds, 2),
            "delivered_signed_per_second": round(len(received) / seconds, 1),
            "dkim_verified_samples": f"{verified}/{len(samples)}",
            "steady_delivered_per_second": round(steady_messages / steady_seconds, 1),
            "steady_worker_cpu_ms_per_message": round(steady_cpu * 1000 / max(steady_messages, 1), 2),
            "worker": f"{options.worker_threads} threads"
            if options.worker_threads
            else f"prefork, {options.worker_processes} processes",
            "load_average": os.getloadavg()[0],
        }
        if options.reference:
            results["reference_postfix_direct"] = postfix_reference(
                postfix.port, sink, options.reference, options.smtp_connections
            )
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        postfix.stop()
        sink.stop()
        shutil.rmtree(postfix_root, ignore_errors=True)
    for name, lines in profiles.items():
        if lines:
            print(f"{name} profile (py-spy, {Path(options.py_spy) / name}.txt):")
            print("\n".join(f"    {line}" for line in lines))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
