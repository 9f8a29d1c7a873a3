"""runsmtp as a real process: start-up failures before forking, children that die with their
supervisor, and a graceful SIGTERM (DATA transactions finish, idle sessions get 421 4.3.2)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mailboxes.models import Message
from mailplatform.testing import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        found.update(int(child) for child in text.split())
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited (its parent is gone, init reaps it)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def reply(sock: socket.socket, buffer: bytearray) -> str:
    """One complete (possibly multi-line) SMTP reply; its last line."""
    while True:
        while b"\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"EOF after {bytes(buffer)!r}")
            buffer += chunk
        line, _, rest = bytes(buffer).partition(b"\r\n")
        buffer[:] = rest
        if line[3:4] != b"-":
            return line.decode()


def session(port: int) -> tuple[socket.socket, bytearray]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    buffer = bytearray()
    assert reply(sock, buffer).startswith("220")
    sock.sendall(b"EHLO client.example.org\r\n")
    assert reply(sock, buffer).startswith("250")
    return sock, buffer


def run_to_exit(server: Any, metrics_port: int) -> subprocess.CompletedProcess[str]:
    """``manage.py runsmtp`` on ``server``'s port and environment, until it exits."""
    return subprocess.run(
        [sys.executable, "manage.py", "runsmtp", "--port", str(server.port), "--metrics-port", str(metrics_port)],
        cwd=ROOT,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_it_stops_at_start_with_one_line_when_the_metrics_port_is_busy(world: Any, runsmtp: Any) -> None:
    server = runsmtp()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        metrics_port = busy.getsockname()[1]
        result = run_to_exit(server, metrics_port)
    assert result.returncode != 0
    problem = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(problem) == 1, result.stderr
    assert str(metrics_port) in problem[0] and "metrics" in problem[0], problem
    assert "Traceback" not in result.stderr
    time.sleep(1.0)  # an orphaned accept process would be listening by now
    assert not listening(server.port)


def test_it_stops_at_start_when_the_smtp_port_is_busy(world: Any, runsmtp: Any) -> None:
    server = runsmtp()
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as another runsmtp would
        busy.bind(("127.0.0.1", server.port))
        busy.listen(1)
        result = run_to_exit(server, 0)
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"CommandError: cannot listen for SMTP on 127.0.0.1:{server.port}: Address already in use"
    ]


def test_it_stops_at_start_when_the_spool_cannot_be_written(world: Any, runsmtp: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    server = runsmtp(SPOOL_DIR=str(blocker / "spool"))  # root ignores modes; a file in the path stops anyone
    result = run_to_exit(server, 0)
    assert result.returncode != 0
    [problem] = [line for line in result.stderr.splitlines() if line.strip()]
    assert problem.startswith(f"CommandError: the spool {blocker / 'spool'} is not writable"), problem
    assert not listening(server.port)


def test_it_stops_its_accept_processes_when_the_supervisor_is_killed(world: Any, runsmtp: Any) -> None:
    server = runsmtp(INGEST_WORKERS="2")
    server.start()
    master = server.process.pid
    workers = children_of(master)
    assert len(workers) == 2
    os.kill(master, signal.SIGKILL)  # the supervisor alone, not its process group
    server.process.wait(10)
    deadline = time.monotonic() + 3
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers)
    assert not listening(server.port)


def test_it_finishes_data_transactions_on_sigterm_and_tells_idle_sessions_421(world: Any, runsmtp: Any) -> None:
    from django.core.management import call_command
    from django.test import override_settings

    server = runsmtp(INGEST_WORKERS="2", INGEST_SHUTDOWN_GRACE="20")
    server.start()
    body = b"From: a@example.org\r\nSubject: shutdown\r\n\r\n" + b"line of the message body\r\n" * 200
    in_data = []
    for n in range(20):
        sock, buffer = session(server.port)
        sock.sendall(f"MAIL FROM:<a@example.org>\r\nRCPT TO:<inbox+{n}@acme.example.test>\r\nDATA\r\n".encode())
        assert reply(sock, buffer).startswith("250")
        assert reply(sock, buffer).startswith("250")
        assert reply(sock, buffer).startswith("354")
        sock.sendall(body[:1000])  # the middle of DATA
        in_data.append((sock, buffer))
    idle = [session(server.port) for _ in range(5)]

    os.kill(server.process.pid, signal.SIGTERM)
    for sock, buffer in idle:  # between commands: told at once, then closed
        assert reply(sock, buffer).startswith("421 4.3.2"), buffer
        assert sock.recv(100) == b""
    time.sleep(1.0)
    assert not listening(server.port)  # no new connections meanwhile
    queue_ids = []
    for sock, buffer in in_data:
        sock.sendall(body[1000:] + b".\r\n")
        answer = reply(sock, buffer)
        assert answer.startswith("250 2.0.0 Ok: queued as"), answer
        queue_ids.append(answer.rsplit(" ", 1)[1])
        assert reply(sock, buffer).startswith("421 4.3.2")  # the transaction done, then the close
        sock.close()
    assert server.process.wait(30) == 0

    with override_settings(SPOOL_DIR=server.spool_dir):
        call_command("drain_spool")  # whatever the drainer had not taken before it stopped
    stored = list(Message.objects.values_list("trace_id", flat=True))
    assert sorted(stored) == sorted(queue_ids)  # each acknowledged message exactly once
    assert len(set(stored)) == 20


def test_it_says_when_it_stops_and_when_it_has_stopped(world: Any, runsmtp: Any) -> None:
    server = runsmtp(INGEST_SHUTDOWN_GRACE="3")
    server.start()  # its probe of the port, closed before the greeting, is no session left open
    idle, buffer = session(server.port)
    time.sleep(0.5)
    os.kill(server.process.pid, signal.SIGTERM)
    assert reply(idle, buffer).startswith("421 4.3.2")
    idle.close()
    assert server.process.wait(30) == 0
    lines = server.log_text().splitlines()
    assert [line for line in lines if "stopping: 1 session, grace 3s" in line], lines[-20:]
    assert lines and lines[-1].endswith("stopped"), lines[-20:]
