"""A real Dovecot for connector tests and bench/imap_pull.py, and the OAuth2 token server it asks.

Debian's ``dovecot-imapd`` (``make test-tools``) runs in the foreground with a throwaway
configuration under a temporary folder: a passwd-file of users (accounts are added while it
runs: the file is read again when it changes), maildirs owned by the ``dovecot`` user, a free
loopback port, and an ``oauth2`` passdb whose introspection URL is :class:`TokenServer`, a
small HTTP server run by the test that is also the connectors' OAuth token endpoint.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from mailplatform.testing import free_port, wait_for_port

DOVECOT = "/usr/sbin/dovecot"
DOVEADM = "/usr/bin/doveadm"


# --- The OAuth2 side: token endpoint (refresh) and introspection (for Dovecot) --------------
@dataclass
class TokenServer:
    """Access and refresh tokens by user; ``revoke`` makes a refresh token fail for good."""

    access: dict[str, str] = field(default_factory=dict)  # access token -> username
    refresh: dict[str, str] = field(default_factory=dict)  # refresh token -> username
    expires_in: int = 3600
    refreshes: int = 0
    token_requests: list[dict[str, str]] = field(default_factory=list)
    port: int = 0
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def grant(self, username: str) -> tuple[str, str]:
        access, refresh = "at-" + secrets.token_urlsafe(16), "rt-" + secrets.token_urlsafe(16)
        self.access[access] = username
        self.refresh[refresh] = username
        return access, refresh

    def expire(self, access: str) -> None:
        self.access.pop(access, None)

    def revoke(self, refresh: str) -> None:
        self.refresh.pop(refresh, None)

    def start(self) -> TokenServer:
        tokens = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # Dovecot: introspection_mode = auth (Bearer header)
                token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                username = tokens.access.get(token)
                if username is None:
                    self._answer(200, {"active": "false"})
                else:
                    self._answer(200, {"active": "true", "username": username})

            def do_POST(self) -> None:  # the connector: grant_type=refresh_token or authorization_code
                length = int(self.headers.get("Content-Length") or 0)
                form = {key: values[0] for key, values in parse_qs(self.rfile.read(length).decode()).items()}
                tokens.token_requests.append(form)
                if form.get("grant_type") == "refresh_token":
                    username = tokens.refresh.get(form.get("refresh_token", ""))
                    if username is None:
                        self._answer(400, {"error": "invalid_grant", "error_description": "revoked"})
                        return
                    tokens.refreshes += 1
                    access = "at-" + secrets.token_urlsafe(16)
                    tokens.access[access] = username
                    self._answer(200, {"access_token": access, "token_type": "Bearer", "expires_in": tokens.expires_in})
                    return
                if form.get("grant_type") == "authorization_code" and form.get("code", "").startswith("code-"):
                    access, refresh = tokens.grant(form["code"].removeprefix("code-"))
                    self._answer(
                        200,
                        {"access_token": access, "refresh_token": refresh, "token_type": "Bearer", "expires_in": 3600},
                    )
                    return
                self._answer(400, {"error": "unsupported_grant_type"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


# --- Dovecot -----------------------------------------------------------------------------
INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")


def inotify_instances_ensure(wanted: int) -> int:
    """At least ``wanted`` inotify instances per user, raised when we may (root); the limit now.

    Every Dovecot ``imap`` process in IDLE holds one instance (all of them run as the
    ``dovecot`` user). Past the limit (128 on many hosts) Dovecot logs "Inotify instance limit
    ... exceeded, disabling" and looks at the maildir every ``mailbox_idle_check_interval``
    instead of being told at once: new mail waits for that round, and a thousand sessions
    looking every second cost the machine's CPU. The sysctl is only ever raised, never lowered.
    """
    try:
        current = int(INOTIFY_INSTANCES.read_text())
    except (OSError, ValueError):
        return 0
    if current < wanted:
        try:
            INOTIFY_INSTANCES.write_text(f"{wanted}\n")
            current = int(INOTIFY_INSTANCES.read_text())
        except OSError:  # not root, or a read-only /proc/sys in a container
            pass
    return current


@dataclass
class Account:
    server: Dovecot
    username: str
    password: str

    def save(self, content: bytes, folder: str = "INBOX") -> None:
        """Deliver a message into ``folder`` (``doveadm save``), as new mail on the server."""
        self.server.doveadm("save", "-u", self.username, "-m", folder, stdin=content)

    def flags(self, folder: str = "INBOX") -> list[str]:
        """The flags of every message in ``folder``, one string per message."""
        output = self.server.doveadm("-f", "tab", "fetch", "-u", self.username, "flags", "mailbox", folder, "all")
        return [line for line in output.splitlines()[1:]]

    def count(self, folder: str = "INBOX") -> int:
        output = self.server.doveadm("-f", "tab", "fetch", "-u", self.username, "uid", "mailbox", folder, "all")
        return len(output.splitlines()[1:])

    def kick(self) -> None:
        """Disconnect the user's sessions (``doveadm kick``)."""
        self.server.doveadm("kick", self.username)

    def folder_create(self, folder: str) -> None:
        self.server.doveadm("mailbox", "create", "-u", self.username, folder)

    def folder_delete(self, folder: str) -> None:
        self.server.doveadm("mailbox", "delete", "-u", self.username, folder)


@dataclass
class Dovecot:
    home: Path
    port: int
    process: subprocess.Popen[bytes]
    tokens: TokenServer | None = None
    tls_port: int = 0  # implicit TLS (imaps); with it the plain port offers STARTTLS
    certificate: Path | None = None  # self-signed, for 127.0.0.1: the CA file that trusts it
    users: list[tuple[str, str]] = field(default_factory=list)
    accounts: int = 0
    inotify_instances: int = 0  # fs.inotify.max_user_instances when it started
    idle_check: int = 30  # mailbox_idle_check_interval, seconds
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def config(self) -> Path:
        return self.home / "dovecot.conf"

    def doveadm(self, *args: str, stdin: bytes | None = None) -> str:
        result = subprocess.run(
            [DOVEADM, "-c", str(self.config), *args], input=stdin, capture_output=True, timeout=30, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args[:3])} failed: {result.stderr.decode(errors='replace')[-500:]}")
        return result.stdout.decode(errors="replace")

    def account_new(self) -> Account:
        """The next of the users made at start, its INBOX created.

        All users are written before Dovecot starts: passwd-file is read again only when it
        notices a change, which a file grown within the same second may not be.
        """
        with self._lock:
            if self.accounts >= len(self.users):
                raise RuntimeError(f"all {len(self.users)} accounts of this Dovecot are in use")
            username, password = self.users[self.accounts]
            self.accounts += 1
        account = Account(self, username, password)
        self.doveadm("mailbox", "create", "-u", username, "-s", "INBOX")
        return account

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.tokens is not None:
            self.tokens.stop()
        shutil.rmtree(self.home, ignore_errors=True)

    def log_text(self) -> str:
        path = self.home / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""


def certificate_make(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate (and its key) for 127.0.0.1 and localhost, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dovecot.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (folder / "key.pem").chmod(0o600)
    return folder / "cert.pem", folder / "key.pem"


def start_dovecot(
    *,
    idle: bool = True,
    oauth: bool = True,
    accounts: int = 50,
    max_connections: int = 100,
    idle_check: int | None = None,
    tls: bool = False,
) -> Dovecot:
    """Dovecot on a free port; ``idle=False`` leaves IDLE out of its capabilities (polling tests).

    ``tls=True``: a self-signed certificate (``Dovecot.certificate``), implicit TLS on
    ``Dovecot.tls_port`` and STARTTLS offered on the plain port; otherwise no TLS at all
    (STARTTLS not offered).

    Each IDLE session learns of new mail through inotify: the limit of instances is raised
    to cover ``max_connections`` sessions where we may (:func:`inotify_instances_ensure`,
    ``Dovecot.inotify_instances`` says what it is). ``idle_check`` is
    ``mailbox_idle_check_interval``, the seconds between Dovecot's own looks at the folder of
    an IDLE session; by default 30 (Dovecot's default) when inotify covers every session,
    1 when it cannot (then every look past the limit is a poll, and new mail waits for it).
    """
    if not Path(DOVECOT).exists():
        raise RuntimeError(f"{DOVECOT} is missing: run `make test-tools` (scripts/install-test-servers.sh)")
    inotify = inotify_instances_ensure(max_connections + 256)  # other Dovecots run meanwhile
    if idle_check is None:
        idle_check = 30 if inotify >= max_connections + 256 else 1
    mail_user = pwd.getpwnam("dovecot")
    # Not under pytest's 0700 tmp folder: the mail processes run as the dovecot user.
    home = Path(tempfile.mkdtemp(prefix="mp-dovecot-"))
    home.chmod(0o755)
    (home / "mail").mkdir()
    os.chown(home / "mail", mail_user.pw_uid, mail_user.pw_gid)
    users = [(f"user{number}", secrets.token_urlsafe(12)) for number in range(1, accounts + 1)]
    (home / "users").write_text(
        "".join(f"{name}:{{PLAIN}}{password}::::{home / 'mail' / name}\n" for name, password in users)
    )
    tokens = TokenServer().start() if oauth else None
    port = free_port()
    tls_port, certificate, ssl_settings = 0, None, "ssl = no\n"
    if tls:
        tls_port = free_port()
        certificate, key = certificate_make(home)
        ssl_settings = f"ssl = yes\nssl_cert = <{certificate}\nssl_key = <{key}\n"
    capability = "" if idle else "imap_capability = IMAP4rev1 SASL-IR LITERAL+ ENABLE UIDPLUS\n"
    oauth_passdb = ""
    if tokens is not None:
        (home / "oauth2.conf").write_text(
            f"introspection_url = {tokens.url}/introspect\n"
            "introspection_mode = auth\n"
            "username_attribute = username\n"
            "active_attribute = active\n"
            "active_value = true\n"
            "tokeninfo_url =\n"
        )
        oauth_passdb = (
            f"passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {home / 'oauth2.conf'}\n}}\n"
        )
    (home / "dovecot.conf").write_text(
        f"""protocols = imap
listen = 127.0.0.1
base_dir = {home / "run"}
state_dir = {home / "state"}
log_path = {home / "dovecot.log"}
default_internal_user = root
default_internal_group = root
default_login_user = dovenull
{ssl_settings}disable_plaintext_auth = no
auth_failure_delay = 0
auth_mechanisms = plain login xoauth2 oauthbearer
mail_location = maildir:~/Maildir
mail_uid = {mail_user.pw_uid}
mail_gid = {mail_user.pw_gid}
first_valid_uid = 0
first_valid_gid = 0
imap_idle_notify_interval = 2 mins
mailbox_idle_check_interval = {idle_check} secs
mailbox_list_index = no
{capability}passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%n {home / "users"}
}}
{oauth_passdb}userdb {{
  driver = passwd-file
  args = username_format=%n {home / "users"}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
  }}
  process_min_avail = 1
  service_count = 0
  client_limit = {max(100, max_connections)}
  process_limit = 4
}}
service imap {{
  process_limit = {max(100, max_connections)}
  client_limit = 1
}}
default_client_limit = {max(1000, max_connections * 2)}
default_process_limit = {max(100, max_connections)}
"""
    )
    (home / "run").mkdir()
    (home / "state").mkdir()
    process = subprocess.Popen(
        [DOVECOT, "-F", "-c", str(home / "dovecot.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    server = Dovecot(
        home=home, port=port, process=process, tokens=tokens, users=users, tls_port=tls_port, certificate=certificate,
        inotify_instances=inotify, idle_check=idle_check,
    )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port, timeout=20)
        if tls_port:
            wait_for_port("127.0.0.1", tls_port, timeout=20)
    except BaseException:
        server.stop()
        raise RuntimeError(f"Dovecot did not start:\n{server.log_text()[-2000:]}") from None
    return server
