#!/usr/bin/env python3
"""`make run`: migrate, create the demo tenant, then run every process under one supervisor.

Children: the web server (uvicorn on mailplatform.asgi), the Celery worker, Celery beat (its own
process, as in docker-compose.yml: the beat that `worker -B` embeds closes the open files of the
process it forks from, the metrics files among them) and the SMTP server (runsmtp). Their output is prefixed with their
name. Ctrl-C (or SIGTERM) stops them all; so does any one of them exiting. The banner (demo
tenant, key, login link) is printed once the web server and SMTP answer; BASE_URL, unless set,
follows --host/--port so the links in it (and in sign-in mail) reach this web server.
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
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
QUEUES = "ingest,parse,index,webhooks,maintenance,outbound"
COLORS = {"web": "36", "worker": "35", "beat": "34", "smtp": "33"}


def manage(*arguments: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "manage.py", *arguments],
        cwd=ROOT,
        check=False,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
    )


def has_command(name: str) -> bool:
    return manage("help", name, capture=True).returncode == 0


class Child:
    def __init__(self, name: str, arguments: list[str], color: bool, env: dict[str, str] | None = None) -> None:
        self.name = name
        prefix = f"{name:<6} | "
        self.prefix = f"\033[{COLORS.get(name, '0')}m{prefix}\033[0m" if color else prefix
        # A session of its own, so a Ctrl-C in the terminal reaches the supervisor only and
        # the children stop in order, once.
        self.process = subprocess.Popen(
            arguments,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._pump, args=(self.process.stdout,), daemon=True)
        self.reader.start()

    def _pump(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            sys.stdout.write(self.prefix + line if line.endswith("\n") else f"{self.prefix}{line}\n")
            sys.stdout.flush()

    def terminate(self) -> None:
        # The child itself: a Celery or SMTP master stops its own workers in order.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGTERM)

    def kill(self) -> None:
        # The whole process group, so no grandchild outlives a child that had to be killed.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


def stop_all(children: list[Child], grace: float = 10.0) -> None:
    for child in children:
        if child.process.poll() is None:
            child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{child.name} did not stop within {grace:.0f}s; killing it", flush=True)
            child.kill()
            child.process.wait()
    for child in children:
        child.kill()  # anything left in a group whose leader has gone
        child.reader.join(timeout=2)


def web_command(host: str, port: int) -> list[str]:
    """uvicorn on mailplatform.asgi. --no-proxy-headers: uvicorn would otherwise rewrite the
    client address from X-Forwarded-For sent by anyone on loopback (its default trust); only
    TRUSTED_PROXIES decides which proxy's header is believed (audit.middleware.client_ip).
    --lifespan off: Django's ASGI application has no lifespan events, which uvicorn would
    otherwise probe for and report unsupported at every start."""
    return [
        PYTHON,
        "-m",
        "uvicorn",
        "mailplatform.asgi:application",
        "--host",
        host,
        "--port",
        str(port),
        "--no-proxy-headers",
        "--lifespan",
        "off",
    ]


def reachable_host(host: str) -> str:
    """The address a browser on this machine uses for a server listening on ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def wait_until_answering(
    web: tuple[str, int], smtp: tuple[str, int] | None, children: list[Child], stopping: threading.Event
) -> bool:
    """Poll the web server's /healthz and the SMTP greeting until both answer.

    False if a child ends or a stop is asked for first.
    """
    import http.client
    import socket

    web_up, smtp_up = False, smtp is None
    started = time.monotonic()
    told = False
    while not stopping.is_set():
        if any(child.process.poll() is not None for child in children):
            return False
        if not web_up:
            connection = http.client.HTTPConnection(*web, timeout=2)
            with contextlib.suppress(OSError, http.client.HTTPException):
                connection.request("GET", "/healthz")
                web_up = connection.getresponse().status == 200
            connection.close()
        if not smtp_up and smtp is not None:
            with contextlib.suppress(OSError), socket.create_connection(smtp, timeout=2) as greeting:
                smtp_up = greeting.recv(4).startswith(b"220")
        if web_up and smtp_up:
            return True
        if not told and time.monotonic() - started > 30:
            print("== waiting for the web server and SMTP to answer", flush=True)
            told = True
        stopping.wait(0.2)
    return False


def banner(demo: dict[str, str], web: str, smtp: str | None) -> str:
    mailbox, key = demo["mailbox"], demo["api_key"]
    submission = [demo["submission"]] if "submission" in demo else []
    lines = [
        "",
        "=" * 78,
        " mailplatform is running (embedded defaults unless DATABASE_URL/CELERY_BROKER_URL/S3_* are set)",
        "=" * 78,
        f"  web          {web}/",
        f"  SMTP         {smtp}" if smtp else "  SMTP         not started (no runsmtp command yet)",
        f"  IMAP / POP3  {demo.get('imap', '')}   (user: the mailbox address, password: the API key)",
        *[f"  submission   {address}   (STARTTLS, then AUTH with the API key)" for address in submission],
        f"  tenant       {demo['tenant']}",
        f"  mailbox      {mailbox}   (id {demo['mailbox_id']})",
        f"  API key      {key}   (shown once; `make run` mints a new one each time)",
        f"  login link   {demo['login_url']}   (single use, 10 minutes)",
        *(
            [f"  sign in as   {demo['user']}   (a new link: {web}/login/, mailed to the sign-in mail below)"]
            if "user" in demo
            else []
        ),
        f"  sign-in mail {demo.get('sign_in_mail', 'EMAIL_URL')}",
        f"  admin        {web}/admin/   (.venv/bin/python manage.py createsuperuser)",
        "",
        "  Try it:",
        "    KEY=mp_...   # the API key above",
        f'    curl -H "Authorization: Bearer $KEY" {web}/api/v1/mailboxes/',
    ]
    if smtp:
        host, _, port = smtp.rpartition(":")
        lines.append(f"    swaks --server {host} --port {port} --to {mailbox} --from you@example.com")
        lines.append(f'    curl -H "Authorization: Bearer $KEY" "{web}/api/v1/messages/?mailbox={demo["mailbox_id"]}"')
    lines += [
        "",
        "  Real mail: point a domain's MX record at a public name of this host, e.g.",
        "    example.com.  MX  10  mx.example.com.",
        "  set MX_HOSTS=mx.example.com (the name domain checks expect) and BASE_URL to the public URL,",
        "  and run SMTP on port 25: --host 0.0.0.0 --smtp-port 25 (README: Trying it, Custom domains).",
        "",
        "  Ctrl-C stops everything.",
        "=" * 78,
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--smtp-port", type=int, default=2525)
    parser.add_argument("--submission-port", type=int, default=2587, help="SMTP submission for outgoing mail")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("INGEST_METRICS_PORT") or 9125),
        help="runsmtp's Prometheus port (0: none)",
    )
    parser.add_argument("--no-smtp", action="store_true", help="do not start the SMTP server")
    parser.add_argument("--imap-port", type=int, default=1143, help="IMAP over the stored mail (runimap)")
    parser.add_argument("--pop3-port", type=int, default=1110, help="POP3 over the stored mail (runpop3)")
    options = parser.parse_args()

    os.chdir(ROOT)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailplatform.settings")
    os.environ.setdefault("LOG_FORMAT", "text")  # people read this terminal; production keeps JSON
    web = f"http://{reachable_host(options.host)}:{options.port}"
    # Links in the banner and in sign-in mail, and signed URLs, point at this web server.
    os.environ.setdefault("BASE_URL", web)
    if "OUTBOUND_ALLOW_PRIVATE" not in os.environ:
        # A laptop's: webhooks (and a test SSO provider) may be servers on this machine. The
        # deployed platform keeps the default, refusing loopback and private addresses.
        os.environ.setdefault("WEBHOOK_ALLOW_PRIVATE", "true")
    # A connector may pull from a Dovecot on this machine or the LAN, without TLS (development).
    os.environ.setdefault("CONNECTOR_ALLOW_INSECURE", "true")
    os.environ["INGEST_METRICS_PORT"] = str(options.metrics_port)  # read by runsmtp
    # The ports chosen here are the ones the console tells mail clients to use.
    os.environ["IMAP_PORT"] = str(options.imap_port)
    os.environ["POP3_PORT"] = str(options.pop3_port)
    os.environ["SUBMISSION_PORT"] = str(options.submission_port)

    print("== migrating the database", flush=True)
    migrated = manage("migrate", "--noinput", "--verbosity=0")
    if migrated.returncode != 0:
        return migrated.returncode  # 2 with one "configuration error: ..." line for a bad setting
    print("== creating the demo tenant", flush=True)
    result = manage("bootstrap_demo", "--json", capture=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        return 1
    demo = json.loads(result.stdout.strip().splitlines()[-1])
    demo["imap"] = f"{reachable_host(options.host)}:{options.imap_port} / {options.pop3_port}"

    smtp_enabled = not options.no_smtp and has_command("runsmtp")
    if smtp_enabled:
        demo["submission"] = f"{reachable_host(options.host)}:{options.submission_port}"
    commands: list[tuple[str, list[str]]] = [
        ("web", web_command(options.host, options.port)),
        (
            "worker",
            [PYTHON, "-m", "celery", "-A", "mailplatform", "worker", "-Q", QUEUES, "-c", "2", "-l", "INFO"],
        ),
        ("beat", [PYTHON, "-m", "celery", "-A", "mailplatform", "beat", "-l", "INFO"]),
    ]
    if smtp_enabled:
        commands.append(
            ("smtp", [PYTHON, "manage.py", "runsmtp", "--host", options.host, "--port", str(options.smtp_port)])
        )
        submission = [PYTHON, "manage.py", "runsmtp", "--submission", "--host", options.host]
        commands.append(("submission", [*submission, "--port", str(options.submission_port)]))
    if has_command("runconnectors"):  # IMAP pull: mail of existing accounts, through leases
        commands.append(("connectors", [PYTHON, "manage.py", "runconnectors"]))
    if has_command("runimap"):  # mail clients (Thunderbird, mutt) read the same store
        commands.append(
            ("imap", [PYTHON, "manage.py", "runimap", "--host", options.host, "--port", str(options.imap_port)])
        )
        commands.append(
            ("pop3", [PYTHON, "manage.py", "runpop3", "--host", options.host, "--port", str(options.pop3_port)])
        )

    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    children: list[Child] = []
    stopping = threading.Event()

    def request_stop(number: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    # The connector runner drains what it spools itself; a spool of its own keeps runsmtp's
    # drainer from taking the same entries a second time (compose does the same).
    data_dir = Path(os.environ.get("DATA_DIR") or ROOT / "var")
    own_env = {"connectors": {"SPOOL_DIR": str((ROOT / data_dir / "connectors-spool").resolve())}}
    for name, arguments in commands:
        children.append(Child(name, arguments, color, env=own_env.get(name)))
    local = reachable_host(options.host).strip("[]")
    smtp_address = (local, options.smtp_port) if smtp_enabled else None
    if wait_until_answering((local, options.port), smtp_address, children, stopping):
        print(banner(demo, web, f"{options.host}:{options.smtp_port}" if smtp_enabled else None), flush=True)

    exit_code = 0
    while not stopping.wait(0.2):
        ended = next((child for child in children if child.process.poll() is not None), None)
        if ended is not None:
            exit_code = ended.process.returncode if (ended.process.returncode or 0) > 0 else 1
            print(f"== {ended.name} exited with {ended.process.returncode}; stopping the others", flush=True)
            break
    else:
        print("== stopping", flush=True)
    stop_all(children)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
