"""SMTP ingest benchmark: mailplatform's runsmtp against a bare aiosmtpd and Postfix's smtp-sink.

    .venv/bin/python bench/smtp_ingest.py [--sizes 10240,102400] [--concurrency 1,10,50] [--seconds 6]

Every receiver gets the same load from the same client: an asyncio (uvloop) generator that
keeps C connections open and sends messages of S bytes back to back, pipelining
MAIL/RCPT/DATA (RFC 2920) and timing each message from the end of its data to the 250. It
prints msgs/s and p50/p99 time-to-250 per receiver, and the RSS of the SMTP processes before
and after the load (flat RSS is part of the target).

- mailplatform: ``manage.py runsmtp --no-drain`` (the durable 250: spool/tmp, fdatasync,
  rename, directory fsync with group commit; the recipient directory loaded from an SQLite
  database in a scratch DATA_DIR; INGEST_WORKERS accept processes, default 2 = the cores).
  Draining is left out so the figure is the front door alone; drain throughput is separate.
- bare aiosmtpd: aiosmtpd 1.4.6 with a handler that answers 250 and keeps nothing (one
  process, the default asyncio loop): the ceiling of a naive Python server.
- smtp-sink: Postfix's C sink (scripts/install-bench-tools.sh), the C ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RCPT = "bench@bench.example.test"

BARE_AIOSMTPD = """
import asyncio, sys
from aiosmtpd.smtp import SMTP

class Nothing:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(Nothing(), hostname="bare"), "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.recv(512)
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing on port {port}")


def process_tree_rss(pid: int) -> int:
    """RSS in KiB of ``pid`` and its children."""
    pids = {pid}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                pids.add(int(entry))
    total = 0
    for each in pids:
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def message(size: int) -> bytes:
    header = b"From: bench@example.org\r\nTo: " + RCPT.encode() + b"\r\nSubject: bench\r\n\r\n"
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"  # 74 bytes
    body = line * ((size - len(header)) // len(line) + 1)
    return (header + body)[: size - 2] + b"\r\n"


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def connection(port: int, data: bytes, stop_at: float, latencies: list[float], errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    await read_reply(reader)
    writer.write(b"EHLO bench.example.org\r\n")
    await read_reply(reader)
    envelope = f"MAIL FROM:<bench@example.org>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
    payload = data + b".\r\n"
    while time.monotonic() < stop_at:
        writer.write(envelope)
        replies = [await read_reply(reader) for _ in range(3)]
        if not (replies[0].startswith(b"250") and replies[1].startswith(b"250") and replies[2].startswith(b"354")):
            errors.append(b" | ".join(r.strip() for r in replies).decode(errors="replace"))
            writer.write(b"RSET\r\n")
            await read_reply(reader)
            await asyncio.sleep(0.01)
            continue
        writer.write(payload)
        sent = time.perf_counter()
        reply = await read_reply(reader)
        if reply.startswith(b"250"):
            latencies.append(time.perf_counter() - sent)
        else:
            errors.append(reply.strip().decode(errors="replace"))
    writer.write(b"QUIT\r\n")
    with contextlib.suppress(Exception):
        await asyncio.wait_for(read_reply(reader), 2)
    writer.close()


async def load(port: int, size: int, concurrency: int, seconds: float) -> tuple[int, float, list[float], list[str]]:
    data = message(size)
    latencies: list[float] = []
    errors: list[str] = []
    started = time.monotonic()
    stop_at = started + seconds
    await asyncio.gather(*(connection(port, data, stop_at, latencies, errors) for _ in range(concurrency)))
    return len(latencies), time.monotonic() - started, latencies, errors


def run_load(port: int, size: int, concurrency: int, seconds: float) -> tuple[int, float, list[float], list[str]]:
    try:
        import uvloop

        return uvloop.run(load(port, size, concurrency, seconds))
    except ImportError:
        return asyncio.run(load(port, size, concurrency, seconds))


@dataclass
class Receiver:
    name: str
    process: subprocess.Popen[bytes]
    port: int

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_mailplatform(scratch: Path, workers: int) -> Receiver:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "DATABASE_URL", "CELERY_BROKER_URL"))}
    env.update(
        DATA_DIR=str(scratch / "data"),
        SPOOL_DIR=str(scratch / "spool"),
        LOG_LEVEL="WARNING",
        LOG_FORMAT="text",
        INGEST_WORKERS=str(workers),
        INGEST_RATE_PER_IP="0",
        INGEST_RATE_PER_TENANT="0",
        INGEST_MAX_CONNECTIONS_PER_IP="0",
        INGEST_SPOOL_LOW_WATER="0",
        INGEST_METRICS_PORT="0",
        DJANGO_SETTINGS_MODULE="mailplatform.settings",
    )
    python = sys.executable
    subprocess.run([python, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    setup = (
        "from tenants.models import Tenant, Domain\n"
        "from mailboxes.models import Mailbox\n"
        "t,_=Tenant.objects.get_or_create(slug='bench', defaults={'name':'Bench'})\n"
        "d,_=Domain.objects.get_or_create(name='bench.example.test', defaults={'tenant':t,'state':'verified'})\n"
        "Mailbox.objects.get_or_create(address='" + RCPT + "', defaults={'tenant':t,'domain':d,'local_part':'bench'})\n"
    )
    subprocess.run([python, "manage.py", "shell", "-c", setup], cwd=ROOT, env=env, check=True, capture_output=True)
    port = free_port()
    process = subprocess.Popen(
        [python, "manage.py", "runsmtp", "--port", str(port), "--no-drain", "--metrics-port", "0"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    wait_port(port)
    time.sleep(1.0)
    return Receiver(f"mailplatform runsmtp ({workers} proc, durable)", process, port)


def start_bare() -> Receiver:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", BARE_AIOSMTPD, str(port)], start_new_session=True)
    wait_port(port)
    return Receiver("bare aiosmtpd (no-op handler)", process, port)


def start_sink() -> Receiver | None:
    sink = shutil.which("smtp-sink") or ("/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None)
    if not sink:
        print("smtp-sink not found: run scripts/install-bench-tools.sh", file=sys.stderr)
        return None
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    process = subprocess.Popen(
        [sink, *user, "-c", f"127.0.0.1:{port}", "1024"], start_new_session=True, stdout=subprocess.DEVNULL
    )
    wait_port(port)
    return Receiver("postfix smtp-sink", process, port)


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10240,102400")
    parser.add_argument("--concurrency", default="1,10,50")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--only", default="", help="comma list: mailplatform,bare,sink")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="mp-bench-"))
    wanted = set(args.only.split(",")) if args.only else {"mailplatform", "bare", "sink"}
    rows = []
    try:
        starters = {
            "mailplatform": lambda: start_mailplatform(scratch, args.workers),
            "bare": start_bare,
            "sink": start_sink,
        }
        for key in ("mailplatform", "bare", "sink"):
            if key not in wanted:
                continue
            receiver = starters[key]()
            if receiver is None:
                continue
            try:
                run_load(receiver.port, 1024, 4, 1.0)  # warm-up
                for size in sizes:
                    for concurrency in levels:
                        rss_before = process_tree_rss(receiver.process.pid)
                        count, elapsed, latencies, errors = run_load(receiver.port, size, concurrency, args.seconds)
                        rss_after = process_tree_rss(receiver.process.pid)
                        row = (
                            receiver.name,
                            size // 1024,
                            concurrency,
                            count / elapsed,
                            percentile(latencies, 0.50) * 1000,
                            percentile(latencies, 0.99) * 1000,
                            rss_before // 1024,
                            rss_after // 1024,
                            len(errors),
                        )
                        rows.append(row)
                        print(
                            f"{row[0]:<42} {row[1]:>4} KiB c={row[2]:<3} {row[3]:8.0f} msg/s "
                            f"p50 {row[4]:6.2f} ms p99 {row[5]:7.2f} ms RSS {row[6]}->{row[7]} MiB errors {row[8]}",
                            flush=True,
                        )
                        if errors:
                            print("   first error:", errors[0], flush=True)
            finally:
                receiver.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print("| receiver | size | conns | msg/s | p50 ms | p99 ms | RSS MiB before -> after | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row[0]} | {row[1]} KiB | {row[2]} | {row[3]:.0f} | {row[4]:.2f} | {row[5]:.2f} | "
            f"{row[6]} -> {row[7]} | {row[8]} |"
        )


if __name__ == "__main__":
    main()
