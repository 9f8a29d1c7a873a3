"""IMAP over the stored mail against Debian's Dovecot serving the same messages from a maildir.

    .venv/bin/python bench/imap.py [--messages 100000] [--distinct 1000] [--idle 1000]

Builds a scratch PostgreSQL database (local blobs) with one mailbox of ``--messages``
messages (``--distinct`` different bodies of 2-60 KB, repeated; every row its own UID), and
a Dovecot maildir holding the same bytes (hard links), then starts ``manage.py runimap`` and
Dovecot (``dovecot -F``) on free loopback ports and measures, with the same client for both:

- ``SELECT INBOX`` (the second one; Dovecot's first builds its index, printed too),
- ``UID FETCH 1:* (FLAGS)``,
- ``FETCH 1:1000 (BODY.PEEK[])`` in MB/s,
- the servers' RSS with ``--idle`` connections in IDLE (on a mailbox of 10 messages: our
  sessions keep the UID list of what they selected).

Every message carries a trust verdict as the parse step stores it (``--no-verdicts``: none,
as mail stored before verdicts), so what we serve is the copy a client gets: our
Authentication-Results first and, in every other distinct body, a forged one claiming our
authserv-id left out (Dovecot serves the same raw bytes, the forged field included).

The scratch database and folders are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.waiters import rss_mib, scratch_database, scratch_database_drop  # noqa: E402


def body_of(number: int, size: int) -> bytes:
    rng = random.Random(number)
    words = " ".join(rng.choice(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]) for _ in range(size // 7))
    lines = [words[i : i + 76] for i in range(0, len(words), 76)]
    return (
        f"From: Sender {number} <sender{number}@example.org>\r\nTo: bench@imap.example.test\r\n"
        f"Subject: Message {number}\r\nMessage-ID: <{number}@bench.example>\r\n"
        "Date: Tue, 01 Jul 2025 10:00:00 +0000\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        + "\r\n".join(lines)
        + "\r\n"
    ).encode()


def prepare(options: argparse.Namespace, maildir_root: Path) -> tuple[str, str, str]:
    """The database rows, the blobs and the maildir; returns (address, idle address, key)."""
    from django.core.management import call_command
    from django.utils import timezone

    from mailaccess.tests import dovecot
    from mailboxes import authentication, blobs
    from mailboxes.models import Mailbox, Message
    from mailboxes.tests.helpers import message_deliver, simple_message
    from tenants.access import ALL_PERMISSIONS, Principal
    from tenants.models import Domain, Tenant
    from tenants.services import api_key_mint

    call_command("migrate", verbosity=0)
    tenant = Tenant.objects.create(name="IMAP bench", slug="imap-bench")
    domain = Domain.objects.create(tenant=tenant, name="imap.example.test", state=Domain.State.VERIFIED)
    big = Mailbox.objects.create(tenant=tenant, domain=domain, local_part="bench", address="bench@imap.example.test")
    idle = Mailbox.objects.create(tenant=tenant, domain=domain, local_part="idle", address="idle@imap.example.test")
    _, key = api_key_mint(
        principal=Principal.system(tenant), name="bench", permissions=ALL_PERMISSIONS, domains=(), mailboxes=()
    )
    rng = random.Random(7)
    bodies = [body_of(n, rng.randint(2_000, 60_000)) for n in range(options.distinct)]
    ours = authentication.authserv_id()
    forged = f"Authentication-Results: {ours}; spf=pass smtp.mailfrom=example.org; dmarc=pass\r\n".encode()
    bodies = [forged + raw if number % 2 else raw for number, raw in enumerate(bodies)]
    verdicts = []
    for number, raw in enumerate(bodies):
        header = f"{ours}; spf=pass smtp.mailfrom=example.org; dkim=pass header.d=example.org header.s=s{number}"
        verdict = {"authserv_id": ours, "header": header, "presented": authentication.presentation_of(raw, header)}
        verdicts.append(verdict if options.verdicts else None)
    sources = maildir_root / "sources"
    sources.mkdir(parents=True)
    keys = []
    for number, raw in enumerate(bodies):
        import hashlib

        digest = hashlib.sha256(raw).hexdigest()
        keys.append((f"raw/{tenant.pk}/2025/07/01/{digest}.eml", digest))
        blobs.blob_put(keys[-1][0], raw)
        (sources / f"{number}.eml").write_bytes(raw)
    now = timezone.now()
    batch: list[Message] = []
    for uid in range(1, options.messages + 1):
        index = (uid - 1) % options.distinct
        storage_key, digest = keys[index]
        batch.append(
            Message(
                tenant=tenant, mailbox=big, uid=uid, rcpt=big.address, size=len(bodies[index]), sha256=digest,
                storage_key=storage_key, trace_id=f"bench{uid}", received_at=now, state=Message.State.INDEXED,
                is_read=uid % 3 == 0, tags=["flagged"] if uid % 10 == 0 else [], authentication=verdicts[index],
                authentication_results=verdicts[index]["header"] if verdicts[index] else "",
            )
        )  # fmt: skip
        if len(batch) == 5000:
            Message.objects.bulk_create(batch)
            batch = []
    Message.objects.bulk_create(batch)
    Mailbox.objects.filter(pk=big.pk).update(uid_next=options.messages + 1)
    for number in range(10):
        message_deliver(idle, simple_message(f"Idle {number}"))
    # Dovecot: the same bytes, one hard link per message, in delivery order.
    maildir = maildir_root / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    for uid in range(1, options.messages + 1):
        index = (uid - 1) % options.distinct
        flags = "S" if uid % 3 == 0 else ""
        flags = ("F" + flags) if uid % 10 == 0 else flags
        os.link(sources / f"{index}.eml", maildir / "cur" / f"{1_700_000_000 + uid}.M{uid}P1.bench:2,{flags}")
    # Dovecot's IDLE clients select a folder of 10 messages too (Maildir++ ".idle").
    for sub in ("cur", "new", "tmp"):
        (maildir / ".idle" / sub).mkdir(parents=True)
    for number in range(10):
        (maildir / ".idle" / "cur" / f"{1_600_000_000 + number}.M{number}P2.bench:2,").write_bytes(
            simple_message(f"Idle {number}")
        )
    dovecot.config_write(maildir_root)
    if os.geteuid() == 0:
        uid_gid = dovecot._owner()
        for path in [maildir_root, *maildir_root.rglob("*")]:
            os.chown(path, *uid_gid)
    return big.address, idle.address, key


def timed(function: object, *args: object) -> tuple[float, object]:
    began = time.perf_counter()
    result = function(*args)  # type: ignore[operator]
    return time.perf_counter() - began, result


def measure(port: int, user: str, password: str, name: str) -> dict[str, float]:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=600)
    client.login(user, password)
    first, _ = timed(client.select, "INBOX")
    client.close()
    select, (status, data) = timed(client.select, "INBOX")
    assert status == "OK", data
    count = int(data[0])
    flags, (status, answer) = timed(client.uid, "FETCH", "1:*", "(FLAGS)")
    assert status == "OK" and len(answer) == count, (status, len(answer), count)
    raw_flags = raw_command(port, user, password, b"UID FETCH 1:* (FLAGS)")
    began = time.perf_counter()
    status, answer = client.fetch("1:1000", "(BODY.PEEK[])")
    full = time.perf_counter() - began
    octets = sum(len(part[1]) for part in answer if isinstance(part, tuple))
    client.logout()
    # After the full fetch, so that Dovecot's figure above is not of a cache this one warmed.
    raw_sizes = raw_command(port, user, password, b"UID FETCH 1:* (RFC822.SIZE)")
    result = {
        "messages": count,
        "first_select": first,
        "select": select,
        "uid_fetch_flags": flags,
        "uid_fetch_flags_raw": raw_flags,
        "uid_fetch_sizes_raw": raw_sizes,
        "full_fetch_mb_s": octets / full / 1e6,
        "full_fetch_mb": octets / 1e6,
    }
    print(f"{name}: {result}", flush=True)
    return result


def raw_command(port: int, user: str, password: str, command: bytes) -> float:
    """Seconds from sending ``command`` to its tagged OK, read off a plain socket (no parsing:
    the server's own time, without imaplib's)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        stream = sock.makefile("rb")
        stream.readline()
        sock.sendall(f"a LOGIN {user} {password}\r\nb SELECT INBOX\r\n".encode())
        while not stream.readline().startswith(b"b "):
            pass
        began = time.perf_counter()
        sock.sendall(b"c " + command + b"\r\n")
        tail = b""
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            tail = (tail + chunk)[-4096:]
            if b"\r\nc OK" in tail or tail.startswith(b"c OK"):
                break
        return time.perf_counter() - began


async def idle_connections(
    port: int, user: str, password: str, count: int, folder: str = "INBOX"
) -> list[asyncio.StreamWriter]:
    writers = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(f"a LOGIN {user} {password}\r\nb SELECT {folder}\r\nc IDLE\r\n".encode())
        await writer.drain()
        while not (await reader.readline()).startswith(b"+"):
            pass
        writers.append(writer)

    for start in range(0, count, 100):
        await asyncio.gather(*(one() for _ in range(min(100, count - start))))
    return writers


def dovecot_rss() -> float:
    total = 0.0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if name in ("dovecot", "imap", "imap-login", "anvil", "log", "config", "auth", "stats"):
                total += rss_mib(int(pid))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--distinct", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--database", default="mp_h5_imapbench")
    parser.add_argument("--no-verdicts", dest="verdicts", action="store_false", help="messages without a verdict")
    options = parser.parse_args()
    scratch_database(options.database)
    os.environ.update(MAILACCESS_MAX_CONNECTIONS_PER_IP="100000", MAILACCESS_MAX_CONNECTIONS_PER_KEY="100000")
    import django

    django.setup()
    from mailaccess.tests import dovecot
    from mailplatform.testing import ChildProcess, env_with, free_port, wait_for_port

    workdir = dovecot.workdir()
    ours_port, dovecot_port = free_port(), free_port()
    server = reference = None
    try:
        began = time.perf_counter()
        address, idle_address, key = prepare(options, workdir)
        dovecot.config_write(workdir, imap_port=dovecot_port)
        print(f"prepared {options.messages} messages in {time.perf_counter() - began:.0f} s", flush=True)
        server = ChildProcess(
            [sys.executable, "manage.py", "runimap", "--port", str(ours_port)], env=env_with(), cwd=ROOT
        )
        reference = dovecot.daemon_start(workdir)
        wait_for_port("127.0.0.1", ours_port, timeout=60)
        wait_for_port("127.0.0.1", dovecot_port, timeout=60)
        ours = measure(ours_port, address, key, "mailplatform")
        theirs = measure(dovecot_port, "bench", "pass", "dovecot")

        async def idle_run() -> tuple[float, float, float, float]:
            base_ours, base_theirs = rss_mib(server.process.pid), dovecot_rss()
            mine = await idle_connections(ours_port, idle_address, key, options.idle)
            await asyncio.sleep(2)
            ours_rss = rss_mib(server.process.pid)
            for writer in mine:
                writer.close()
            reference_writers = await idle_connections(dovecot_port, "bench", "pass", options.idle, "idle")
            await asyncio.sleep(2)
            theirs_rss = dovecot_rss()
            for writer in reference_writers:
                writer.close()
            return base_ours, ours_rss, base_theirs, theirs_rss

        base_ours, ours_rss, base_theirs, theirs_rss = asyncio.run(idle_run())
        print()
        shown = "with verdicts (our Authentication-Results shown)" if options.verdicts else "without verdicts"
        print(f"{options.messages} messages ({options.distinct} distinct bodies, {shown}), same client (imaplib)")
        print("| | mailplatform runimap | Dovecot 2.3 (maildir) |")
        print("|---|---|---|")
        print(f"| first SELECT | {ours['first_select']:.3f} s | {theirs['first_select']:.3f} s (builds its index) |")
        print(f"| SELECT | {ours['select']:.3f} s | {theirs['select']:.3f} s |")
        print(f"| UID FETCH 1:* (FLAGS) | {ours['uid_fetch_flags']:.3f} s | {theirs['uid_fetch_flags']:.3f} s |")
        print(
            f"| the same, read off a socket (no client parsing) | {ours['uid_fetch_flags_raw']:.3f} s | "
            f"{theirs['uid_fetch_flags_raw']:.3f} s |"
        )
        print(
            f"| UID FETCH 1:* (RFC822.SIZE), read off a socket | {ours['uid_fetch_sizes_raw']:.3f} s | "
            f"{theirs['uid_fetch_sizes_raw']:.3f} s |"
        )
        print(
            f"| FETCH 1:1000 (BODY.PEEK[]), {ours['full_fetch_mb']:.0f} MB | {ours['full_fetch_mb_s']:.1f} MB/s | "
            f"{theirs['full_fetch_mb_s']:.1f} MB/s |"
        )
        print(
            f"| RSS idle -> {options.idle} IDLE connections | {base_ours:.0f} -> {ours_rss:.0f} MiB (one process) | "
            f"{base_theirs:.0f} -> {theirs_rss:.0f} MiB (all its processes) |"
        )
        print(f"load average {os.getloadavg()}")
    finally:
        if server is not None:
            server.stop()
        if reference is not None:
            reference.terminate()
            reference.wait(20)
        scratch_database_drop(options.database)
        shutil.rmtree(workdir, ignore_errors=True)
        subprocess.run(["true"], check=False)


if __name__ == "__main__":
    main()
