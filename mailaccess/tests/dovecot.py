"""Debian's Dovecot as the reference IMAP server: the parity test and bench/imap.py."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

IMAP_BINARY = Path("/usr/lib/dovecot/imap")
DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"


def require() -> None:
    import pytest

    if not IMAP_BINARY.exists():
        pytest.fail("Dovecot is not installed: run scripts/install-test-servers.sh (make test-tools does)")


def _owner() -> tuple[int, int]:
    entry = pwd.getpwnam("dovecot") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
    return entry.pw_uid, entry.pw_gid


def maildir_write(root: Path, messages: list[bytes]) -> Path:
    """A maildir holding ``messages`` in order (file names sort as delivered)."""
    maildir = root / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    for number, raw in enumerate(messages, 1):
        (maildir / "cur" / f"{1_700_000_000 + number}.M{number}P1.bench:2,").write_bytes(raw)
    uid, gid = _owner()
    if os.geteuid() == 0:
        for path in [root, *root.rglob("*")]:
            os.chown(path, uid, gid)
    return maildir


def config_write(root: Path, *, imap_port: int = 0) -> Path:
    """A throwaway configuration: static password "pass" for anyone, the maildir under ``root``."""
    user = pwd.getpwuid(_owner()[0]).pw_name
    lines = [
        f"mail_location = maildir:{root / 'Maildir'}",
        f"log_path = {root / 'dovecot.log'}",
        f"base_dir = {root / 'run'}",
        f"state_dir = {root / 'state'}",
        f"mail_uid = {user}",
        f"mail_gid = {user}",
        "first_valid_uid = 1",
        "first_valid_gid = 1",
        "ssl = no",
        "disable_plaintext_auth = no",
        "auth_mechanisms = plain login",
        "protocols = imap",
        "listen = 127.0.0.1",
        f"default_internal_user = {user}",
        f"default_login_user = {user}",
        "passdb {\n  driver = static\n  args = password=pass\n}",
        f"userdb {{\n  driver = static\n  args = uid={user} gid={user} home={root}\n}}",
        f"service imap-login {{\n  inet_listener imap {{\n    port = {imap_port}\n  }}\n"
        "  inet_listener imaps {\n    port = 0\n  }\n  process_limit = 4\n  client_limit = 2000\n"
        "  service_count = 0\n}",
        "service imap {\n  process_limit = 2000\n}",
        "default_client_limit = 4000\n",
        "default_vsz_limit = 1G",
        "mail_max_userip_connections = 5000",
    ]
    path = root / "dovecot.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def imap_stream_command(root: Path) -> str:
    """A preauthenticated imap process on stdin/stdout (``imaplib.IMAP4_stream``)."""
    user = pwd.getpwuid(_owner()[0]).pw_name
    return f"env HOME={root} USER={user} {IMAP_BINARY} -c {root / 'dovecot.conf'}"


def daemon_start(root: Path) -> subprocess.Popen[bytes]:
    """The whole Dovecot (master, login and imap processes) in the foreground."""
    (root / "run").mkdir(exist_ok=True)
    (root / "state").mkdir(exist_ok=True)
    return subprocess.Popen(
        [DOVECOT, "-F", "-c", str(root / "dovecot.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )


def workdir() -> Path:
    """A folder Dovecot's unprivileged user can reach (pytest's tmp_path is root-only)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="mailplatform-dovecot-"))
    root.chmod(0o755)
    return root
