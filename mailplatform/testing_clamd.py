"""A real clamd for tests and benchmarks: Debian's daemon with a throwaway configuration.

Its signature database is written here, not downloaded (freshclam cannot reach the internet
from the test machines): a body signature (``.ndb``, any file type) of the EICAR test file's
bytes, which clamd finds in a message as sent, and only after decoding it in a base64 MIME
part (nested multiparts too) or unpacking it from a deflated zip. clamd reports it as
``Mailplatform.Test.EICAR.UNOFFICIAL`` (a signature outside the official databases). A
database this small loads in well under a second.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from mailplatform.testing import free_port

# The EICAR anti-malware test file (https://www.eicar.org): harmless, recognised by every scanner.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SIGNATURE = "Mailplatform.Test.EICAR"
FOUND = f"{SIGNATURE}.UNOFFICIAL"  # what clamd answers
CLAMD_BINARY = "/usr/sbin/clamd"


def clamd_binary() -> str:
    found = shutil.which("clamd") or (CLAMD_BINARY if Path(CLAMD_BINARY).exists() else None)
    if not found:
        raise RuntimeError("clamd is not installed: run `make test-tools` (scripts/install-test-servers.sh)")
    return found


class ClamdServer:
    """``clamd --foreground`` on a free loopback port and a unix socket, until :meth:`stop`."""

    def __init__(self, *, stream_max_length: str = "25M", folder: Path | None = None) -> None:
        self.folder = Path(folder or tempfile.mkdtemp(prefix="mp-clamd-"))
        self.port = free_port()
        self.socket_path = self.folder / "clamd.sock"
        self.stream_max_length = stream_max_length
        self.process: subprocess.Popen[bytes] | None = None
        database = self.folder / "db"
        database.mkdir(parents=True, exist_ok=True)
        (database / "mailplatform-test.ndb").write_text(f"{SIGNATURE}:0:*:{EICAR.hex()}\n")
        self.config = self.folder / "clamd.conf"
        self.config.write_text(
            "\n".join(
                [
                    "Foreground yes",
                    f"TCPSocket {self.port}",
                    "TCPAddr 127.0.0.1",
                    f"LocalSocket {self.socket_path}",
                    f"DatabaseDirectory {database}",
                    f"StreamMaxLength {stream_max_length}",
                    f"LogFile {self.folder / 'clamd.log'}",
                    f"PidFile {self.folder / 'clamd.pid'}",
                    "SelfCheck 0",
                    "",
                ]
            )
        )

    @property
    def tcp_url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 30.0) -> ClamdServer:
        self.process = subprocess.Popen(
            [clamd_binary(), "--foreground", f"--config-file={self.config}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"clamd exited with {self.process.returncode}: {self.log_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"zPING\0")
                    if sock.recv(16).startswith(b"PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"clamd did not answer PING within {timeout}s: {self.log_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def log_text(self) -> str:
        try:
            return (self.folder / "clamd.log").read_text(errors="replace")
        except OSError:
            return ""
