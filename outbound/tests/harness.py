"""Real peers for outbound tests: an aiosmtpd sink playing the remote MX, and Debian's Postfix
in a throwaway configuration relaying to it (the smarthost)."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email import message_from_bytes
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from mailplatform.testing import free_port, wait_for_port


@dataclass
class Received:
    mail_from: str
    rcpt: str
    content: bytes

    @property
    def message_id(self) -> str:
        return str(message_from_bytes(self.content).get("Message-ID", ""))


@dataclass
class SinkHandler:
    """Accepts everything, except: ``refuse`` (550 at RCPT), ``defer_once`` (451 at RCPT, the
    first time), ``rcpt_delay`` (seconds to wait before answering RCPT)."""

    received: list[Received] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    defer_once: set[str] = field(default_factory=set)
    rcpt_delay: float = 0.0
    rcpt_seen: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        self.rcpt_seen.set()
        if self.rcpt_delay:
            import asyncio

            await asyncio.sleep(self.rcpt_delay)
        lowered = address.lower()
        if lowered in self.refuse:
            return "550 5.1.1 No such user here"
        with self.lock:
            if lowered in self.defer_once:
                self.defer_once.discard(lowered)
                return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.received.append(Received(envelope.mail_from, rcpt.lower(), bytes(envelope.original_content)))
        return "250 2.0.0 Ok: queued"

    def reset(self) -> None:
        with self.lock:
            self.received.clear()
            self.refuse.clear()
            self.defer_once.clear()
            self.rcpt_delay = 0.0
            self.rcpt_seen.clear()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.05)
        raise AssertionError(f"the sink got {len(self.received)} messages, expected {count}")

    def counts(self) -> Counter[tuple[str, str]]:
        with self.lock:
            return Counter((item.rcpt, item.message_id) for item in self.received)


class Sink:
    def __init__(self) -> None:
        self.handler = SinkHandler()
        self.port = free_port()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port, decode_data=False)
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()


class Postfix:
    """``master -d`` in the foreground on a free loopback port, relaying everything to the sink
    (``relayhost``) and DSNs for the bounce domain to ``bounce_port`` (our own runsmtp)."""

    def __init__(self, root: Path, *, relay_port: int, bounce_domain: str, bounce_port: int) -> None:
        if shutil.which("postconf") is None:
            raise RuntimeError("Postfix is not installed: run scripts/install-test-servers.sh (make test-tools)")
        self.port = free_port()
        self.root = root
        conf, queue, data = root / "conf", root / "queue", root / "data"
        for folder in (conf, queue, data):
            folder.mkdir(parents=True, exist_ok=True)
        master = Path("/usr/share/postfix/master.cf.dist").read_text()
        master = re.sub(r"^smtp\s+inet.*$", f"127.0.0.1:{self.port} inet n - n - - smtpd", master, flags=re.M)
        # No chroot: the throwaway queue has no copy of /etc inside it.
        master = re.sub(r"^(\S+\s+\S+\s+\S+\s+\S+\s+)y(\s)", r"\1n\2", master, flags=re.M)
        (conf / "master.cf").write_text(master)
        self.log = root / "maillog"
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(queue),
            "data_directory": str(data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "relay.outbound.test",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[127.0.0.1]:{relay_port}",
            "transport_maps": f"inline:{{{bounce_domain}=smtp:[127.0.0.1]:{bounce_port}}}",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtp_tls_security_level": "none",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "maillog_file": "/dev/stdout",
            "smtp_dns_support_level": "disabled",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "bounce_queue_lifetime": "0",
            "biff": "no",
            "smtpd_banner": "$myhostname ESMTP",
            "smtp_connection_cache_on_demand": "yes",
            "default_process_limit": "20",
        }
        (conf / "main.cf").write_text("")
        subprocess.run(
            ["postconf", "-c", str(conf), "-e", *[f"{name}={value}" for name, value in settings.items()]],
            check=True,
            capture_output=True,
        )
        # What ``postfix set-permissions`` would make (that command insists on /etc/postfix).
        (queue / "pid").mkdir(exist_ok=True)
        for name in (
            "active",
            "bounce",
            "corrupt",
            "defer",
            "deferred",
            "flush",
            "hold",
            "incoming",
            "private",
            "saved",
            "trace",
            "maildrop",
            "public",
        ):
            folder = queue / name
            folder.mkdir(exist_ok=True)
            shutil.chown(folder, user="postfix", group="postdrop" if name in ("maildrop", "public") else None)
            folder.chmod({"maildrop": 0o730, "public": 0o710}.get(name, 0o700))
        shutil.chown(data, user="postfix")
        self.process = subprocess.Popen(
            ["/usr/lib/postfix/sbin/master", "-c", str(conf), "-d"],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port("127.0.0.1", self.port, timeout=20)
        except BaseException:
            self.stop()
            raise

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
