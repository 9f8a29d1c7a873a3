"""`make run`'s path end to end: the embedded defaults (SQLite, local blobs, filesystem broker).

Runs the real commands in a temporary DATA_DIR with DATABASE_URL, CELERY_BROKER_URL and
S3_* removed, serves the ASGI app with uvicorn, and runs the maintenance task through a
filesystem-broker Celery worker.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from mailplatform.testing import ChildProcess, free_port, run_script, start_celery_worker, wait_for_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
REMOVED = ("DATABASE_URL", "CELERY_BROKER_URL", "CACHE_URL", "SPOOL_DIR")


def embedded_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in REMOVED and not name.startswith("S3_") and name != "DJANGO_SETTINGS_MODULE"
    }
    env.update(DATA_DIR=str(data_dir), LOG_FORMAT="text", LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    env.update(overrides)
    return env


def manage(env: dict[str, str], *arguments: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class Embedded:
    data_dir: Path
    env: dict[str, str]
    demo: dict[str, str]
    base_url: str
    web: ChildProcess  # `make run`'s web command, logging at INFO as `make run` does

    @property
    def database(self) -> Path:
        return self.data_dir / "mailplatform.sqlite3"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    data_dir = tmp_path_factory.mktemp("embedded") / "var"
    env = embedded_env(data_dir)
    migrated = manage(env, "migrate", "--noinput")
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    bootstrapped = manage(env, "bootstrap_demo", "--json")
    assert bootstrapped.returncode == 0, bootstrapped.stderr[-3000:]
    demo = json.loads(bootstrapped.stdout.strip().splitlines()[-1])

    port = free_port()
    web = ChildProcess(run_script().web_command("127.0.0.1", port), env={**env, "LOG_LEVEL": "INFO"}, cwd=ROOT)
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        yield Embedded(data_dir=data_dir, env=env, demo=demo, base_url=f"http://127.0.0.1:{port}", web=web)
    finally:
        web.stop()


def test_it_uses_only_embedded_storage(embedded: Embedded) -> None:
    assert embedded.database.exists()
    assert (embedded.data_dir / "broker" / "queue").is_dir()
    assert (embedded.data_dir / "secrets" / "secret_key").exists()
    assert oct((embedded.data_dir / "secrets" / "secret_key").stat().st_mode & 0o777) == "0o600"


def test_it_prints_the_demo_as_json_and_is_idempotent(embedded: Embedded) -> None:
    demo = embedded.demo
    for key in ("tenant", "domain", "mailbox", "mailbox_id", "api_key", "login_url"):
        assert demo.get(key), key
    assert demo["api_key"].startswith("mp_")
    assert demo["mailbox"].endswith("@" + demo["domain"])
    assert "/login/" in demo["login_url"]

    again = manage(embedded.env, "bootstrap_demo", "--json")
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout.strip().splitlines()[-1])
    assert (second["tenant"], second["mailbox"], second["mailbox_id"]) == (
        demo["tenant"],
        demo["mailbox"],
        demo["mailbox_id"],
    )
    assert second["api_key"] != demo["api_key"]
    with sqlite3.connect(embedded.database) as db:
        assert db.execute("select count(*) from mailboxes_mailbox").fetchone() == (1,)
        assert db.execute("select count(*) from tenants_tenant").fetchone() == (1,)


def test_it_serves_healthz_and_readyz_on_embedded_services(embedded: Embedded) -> None:
    assert requests.get(f"{embedded.base_url}/healthz", timeout=10).status_code == 200
    response = requests.get(f"{embedded.base_url}/readyz", timeout=10)
    assert response.status_code == 200, response.text
    checks = response.json()["checks"]
    assert {name: check["ok"] for name, check in checks.items()} == {"database": True, "broker": True, "blobs": True}


def test_it_lists_the_demo_mailbox_with_the_printed_key(embedded: Embedded) -> None:
    headers = {"Authorization": f"Bearer {embedded.demo['api_key']}"}
    response = requests.get(f"{embedded.base_url}/api/v1/mailboxes/", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    rows = response.json()["results"]
    assert [(row["id"], row["address"]) for row in rows] == [(embedded.demo["mailbox_id"], embedded.demo["mailbox"])]
    assert requests.get(f"{embedded.base_url}/api/v1/mailboxes/", timeout=10).status_code == 401


def test_it_serves_static_files_and_the_admin_login(embedded: Embedded) -> None:
    page = requests.get(f"{embedded.base_url}/admin/login/", timeout=10)
    assert page.status_code == 200
    css = requests.get(f"{embedded.base_url}/static/admin/css/base.css", timeout=10)
    assert css.status_code == 200
    assert "text/css" in css.headers["Content-Type"]


def test_it_runs_the_maintenance_task_through_the_filesystem_broker(embedded: Embedded) -> None:
    queue = f"maintenance-embedded-{uuid.uuid4().hex[:8]}"
    marker = uuid.uuid4().hex + uuid.uuid4().hex
    user = embedded.demo.get("user", "demo@mailplatform.localhost")
    enqueue = "\n".join(
        [
            "from datetime import timedelta",
            "from django.utils import timezone",
            "from tenants.models import User",
            "from webinbox.models import LoginToken",
            "from webinbox.tasks import login_tokens_purge",
            f"user = User.objects.get(email__iexact={user!r})",
            f"LoginToken.objects.create(user=user, token_hash={marker!r}, expires_at=timezone.now()-timedelta(days=3))",
            f"print(LoginToken.objects.filter(token_hash={marker!r}).count())",
            f"login_tokens_purge.apply_async(queue={queue!r})",
        ]
    )

    def stale_rows() -> int:
        with sqlite3.connect(embedded.database) as db:
            return int(
                db.execute("select count(*) from webinbox_logintoken where token_hash = ?", [marker]).fetchone()[0]
            )

    worker = start_celery_worker(queue=queue, env=embedded.env, cwd=ROOT)
    try:
        sent = manage(embedded.env, "shell", "--verbosity=0", "-c", enqueue)
        assert sent.returncode == 0, sent.stderr[-3000:]
        assert sent.stdout.strip().splitlines()[-1] == "1"  # the stale link existed before the task
        deadline = time.monotonic() + 60
        while stale_rows():
            assert time.monotonic() < deadline, worker.output[-3000:]
            time.sleep(0.2)
    finally:
        worker.stop()
    assert "succeeded" in worker.output


def _web_output_after(embedded: Embedded, path: str) -> str:
    """The web server's output once it has logged the access line of a last request to ``path``."""
    requests.get(f"{embedded.base_url}{path}", timeout=10)
    deadline = time.monotonic() + 10
    while path not in embedded.web.output and time.monotonic() < deadline:
        time.sleep(0.05)
    return embedded.web.output


def test_it_writes_sign_in_mail_to_files_in_the_data_dir_never_to_the_output(embedded: Embedded) -> None:
    outbox = embedded.data_dir / "outbox"
    with requests.Session() as browser:
        page = browser.get(f"{embedded.base_url}/login/", timeout=10)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert token is not None, page.text[:2000]
        sent = browser.post(
            f"{embedded.base_url}/login/",
            data={"csrfmiddlewaretoken": token.group(1), "email": embedded.demo["user"]},
            timeout=10,
        )
        assert sent.status_code == 200, sent.text[:2000]
    # The backend creates the file, then writes the message into it: wait for the whole of it.
    deadline = time.monotonic() + 20
    mail = ""
    while time.monotonic() < deadline:
        mail = "".join(path.read_text() for path in sorted(outbox.glob("*")))
        if re.search(r"/login/link/[A-Za-z0-9_-]{20,}/", mail) and mail.rstrip().endswith("-" * 79):
            break
        time.sleep(0.1)
    link = re.search(r"/login/link/([A-Za-z0-9_-]{20,})/", mail)
    assert link is not None, (mail, embedded.web.output[-3000:])
    assert "From: mailplatform <noreply@mailplatform.localhost>" in mail  # no IP for a sender domain
    assert oct(outbox.stat().st_mode & 0o777) == "0o700"  # the links are for the recipient alone
    output = _web_output_after(embedded, "/healthz")
    assert link.group(1) not in output and "X-Mailplatform-Signin" not in output, output[-3000:]


def test_it_streams_the_raw_message_download_exactly_without_a_warning(embedded: Embedded) -> None:
    import hashlib

    raw = b"From: a@example.org\r\nSubject: big\r\n\r\n" + b"".join(
        hashlib.sha256(str(n).encode()).hexdigest().encode() + b"\r\n" for n in range(12000)
    )
    source = embedded.data_dir / "big.eml"
    source.write_bytes(raw)  # about 800 KB: many chunks of the response
    store = "\n".join(
        [
            "from pathlib import Path",
            "from mailboxes import blobs",
            "from mailboxes.models import Mailbox",
            "from mailboxes.tests.helpers import message_store",
            f"mailbox = Mailbox.objects.get(pk={embedded.demo['mailbox_id']!r})",
            f"message = message_store(mailbox, Path({str(source)!r}).read_bytes())",
            "name = f'{message.pk}.eml'",
            "print(blobs.blob_signed_url(message.storage_key, filename=name, content_type='message/rfc822'))",
        ]
    )
    stored = manage(embedded.env, "shell", "--verbosity=0", "-c", store)
    assert stored.returncode == 0, stored.stderr[-3000:]
    path = "/blobs/" + stored.stdout.strip().splitlines()[-1].split("/blobs/", 1)[1]
    download = requests.get(embedded.base_url + path, timeout=30)
    assert download.status_code == 200
    assert download.content == raw
    assert download.headers["Content-Length"] == str(len(raw))
    exported = requests.get(
        f"{embedded.base_url}/api/v1/audit/export/?format=csv",
        headers={"Authorization": f"Bearer {embedded.demo['api_key']}"},
        timeout=30,
    )
    assert exported.status_code == 200 and exported.text.count("\n") > 1, exported.text[:500]
    output = _web_output_after(embedded, "/healthz")
    assert "StreamingHttpResponse must consume" not in output, output[-3000:]


def test_it_serves_a_favicon_so_page_views_log_no_not_found(embedded: Embedded) -> None:
    page = requests.get(f"{embedded.base_url}/login/", timeout=10)
    icon = re.search(r'<link rel="icon" href="([^"]+)"', page.text)
    assert icon is not None
    linked = requests.get(embedded.base_url + icon.group(1), timeout=10)
    assert linked.status_code == 200 and linked.headers["Content-Type"].startswith("image/svg+xml")
    asked = requests.get(f"{embedded.base_url}/favicon.ico", timeout=10)  # what browsers ask regardless
    assert asked.status_code == 200 and asked.content == linked.content
    output = _web_output_after(embedded, "/healthz")
    assert "/favicon.ico" in output and "Not Found" not in output, output[-3000:]


def test_it_starts_the_web_server_without_noise(embedded: Embedded) -> None:
    output = _web_output_after(embedded, "/healthz")
    assert "lifespan" not in output.lower(), output[-3000:]
    assert "No hostname was supplied" not in output, output[-3000:]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DEBUG", "maybe"),
        ("DATABASE_URL", "mysql://user:pw@127.0.0.1/mailplatform"),
        ("CELERY_BROKER_URL", "kafka://127.0.0.1:9092"),
        ("SMTP_PORT", "99999"),
    ],
)
def test_it_refuses_to_start_with_a_bad_setting_and_names_it(tmp_path: Path, name: str, value: str) -> None:
    result = manage(embedded_env(tmp_path / "var", **{name: value}), "check", timeout=60)
    assert result.returncode != 0
    assert name in result.stderr
    assert "pw@" not in result.stderr or name != "DATABASE_URL" or "mysql" in result.stderr


_MAIL_SETTINGS = (
    "import json; from django.conf import settings; print(json.dumps([settings.MX_HOSTS, settings.DEFAULT_FROM_EMAIL,"
    " settings.EMAIL_BACKEND, settings.EMAIL_FILE_PATH]))"
)


def _mail_settings(env: dict[str, str]) -> list[Any]:
    env.pop("EMAIL_URL", None)
    result = manage(env, "shell", "--verbosity=0", "-c", _MAIL_SETTINGS, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


def test_it_names_mail_hosts_by_a_domain_when_base_url_is_an_ip(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    assert _mail_settings(embedded_env(data_dir, BASE_URL="http://127.0.0.1:8400")) == [
        ["mx.mailplatform.localhost"],
        "mailplatform <noreply@mailplatform.localhost>",
        "django.core.mail.backends.filebased.EmailBackend",
        str(data_dir.resolve() / "outbox"),
    ]
    public = _mail_settings(embedded_env(data_dir, BASE_URL="https://mail.example.com"))
    assert public[:2] == [["mx.mail.example.com"], "mailplatform <noreply@mail.example.com>"]
    explicit = embedded_env(
        data_dir, BASE_URL="http://127.0.0.1:8400", MX_HOSTS="mx1.example.net", DEFAULT_FROM_EMAIL="ops@example.net"
    )
    assert _mail_settings(explicit)[:2] == [["mx1.example.net"], "ops@example.net"]


def test_it_reads_secrets_from_file_variants(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("a-secret-key-from-a-file-0123456789-abcdefghijklmnopqrstuvwxyz\n")
    env = embedded_env(tmp_path / "var", SECRET_KEY_FILE=str(secret_file))
    env.pop("SECRET_KEY", None)
    result = manage(
        env, "shell", "--verbosity=0", "-c", "from django.conf import settings; print(settings.SECRET_KEY[:20])"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "a-secret-key-from-a-"
    missing = embedded_env(tmp_path / "var", SECRET_KEY_FILE=str(tmp_path / "nope"))
    missing.pop("SECRET_KEY", None)
    result = manage(missing, "check", timeout=60)
    assert result.returncode != 0
    assert "SECRET_KEY_FILE" in result.stderr


def test_it_prints_the_banner_once_web_and_smtp_answer_with_links_on_its_own_port(tmp_path: Path) -> None:
    import signal
    import socket

    web_port, smtp_port, metrics_port = free_port(), free_port(), free_port()
    imap_port, pop3_port, submission_port = free_port(), free_port(), free_port()
    env = embedded_env(tmp_path / "var", LOG_LEVEL="INFO")  # what `make run` shows
    for name in ("BASE_URL", "EMAIL_URL", "WEBHOOK_ALLOW_PRIVATE", "OUTBOUND_ALLOW_PRIVATE"):
        env.pop(name, None)
    run = ChildProcess(
        [
            sys.executable,
            "scripts/run.py",
            "--port",
            str(web_port),
            "--smtp-port",
            str(smtp_port),
            "--metrics-port",
            str(metrics_port),
            "--imap-port",
            str(imap_port),
            "--pop3-port",
            str(pop3_port),
            "--submission-port",
            str(submission_port),
        ],
        env=env,
        cwd=ROOT,
    )
    try:
        run.wait_for_line("login link", timeout=300)
        # Printed only now that both answer: nothing here waits.
        assert requests.get(f"http://127.0.0.1:{web_port}/healthz", timeout=5).status_code == 200
        with socket.create_connection(("127.0.0.1", smtp_port), timeout=5) as smtp:
            assert smtp.recv(100).startswith(b"220")
        metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        assert metrics.status_code == 200  # runsmtp got --metrics-port through INGEST_METRICS_PORT
        [login] = [line for line in run.lines if "login link" in line]
        assert f"http://127.0.0.1:{web_port}/login/link/" in login
        assert sum("login link" in line for line in run.lines) == 1
        assert any("MX" in line and "MX_HOSTS" in line for line in run.lines)
        link = login.split("login link", 1)[1].split()[0]
        landing = requests.get(link, timeout=10, allow_redirects=False)
        assert landing.status_code == 302  # the link is served by this very web server
        # Signed in, the console tells mail clients the ports this run listens on.
        browser = requests.Session()
        confirm = browser.get(link, timeout=10)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', confirm.text)
        assert confirm.status_code == 200 and token, confirm.text[:500]
        signed_in = browser.post(confirm.url, data={"csrfmiddlewaretoken": token.group(1)}, timeout=10)
        assert signed_in.status_code == 200, signed_in.text[:500]
        [slug] = [line.split()[1] for line in run.lines if line.strip().startswith("tenant ")]
        page = browser.get(f"http://127.0.0.1:{web_port}/console/{slug}/app-passwords/", timeout=10)
        assert page.status_code == 200, page.text[:500]
        assert f":{imap_port}" in page.text and f":{pop3_port}" in page.text, page.text[-3000:]
        [key] = [line.split()[2] for line in run.lines if line.strip().startswith("API key ")]
        assert sum(key in line for line in run.lines) == 1  # the curl lines say $KEY
        # A laptop's receiver on this machine is a webhook endpoint make run takes.
        hook = requests.post(
            f"http://127.0.0.1:{web_port}/api/v1/webhooks/",
            json={"url": "http://127.0.0.1:9/hook"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert hook.status_code == 201, hook.text
        # The connector runner spools into a folder of its own, which runsmtp's drainer never reads.
        deadline = time.monotonic() + 30
        while not (tmp_path / "var" / "connectors-spool").is_dir() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "var" / "connectors-spool").is_dir(), run.output[-3000:]
        [mail] = [line for line in run.lines if line.strip().startswith("sign-in mail ")]
        assert str((tmp_path / "var" / "outbox").resolve()) in mail
        os.kill(run.process.pid, signal.SIGTERM)
        assert run.process.wait(60) == 0
    finally:
        run.stop(timeout=60)
    output = run.output
    assert "No hostname was supplied" not in output, output[-4000:]  # kombu, of the embedded broker
    assert "lifespan" not in output.lower(), output[-4000:]  # uvicorn's probe, off
    smtp = [line for line in run.lines if line.startswith("smtp ")]
    assert any("stopping: 0 sessions" in line for line in smtp), smtp[-10:]
    assert smtp[-1].endswith("stopped"), smtp[-10:]


def test_it_stores_uploaded_messages_on_the_embedded_database_with_their_uids(embedded: Embedded) -> None:
    """The spool's drain on SQLite: rows and per-mailbox UIDs (the path SMTP mail takes too)."""
    mailbox_id = embedded.demo["mailbox_id"]
    headers = {"Authorization": f"Bearer {embedded.demo['api_key']}", "Content-Type": "message/rfc822"}
    queue_ids = []
    for number in (1, 2):
        raw = f"From: a@example.org\r\nSubject: embedded {number}\r\nMessage-ID: <e{number}@x>\r\n\r\nhello\r\n"
        url = f"{embedded.base_url}/api/v1/mailboxes/{mailbox_id}/messages/"
        uploaded = requests.post(url, data=raw.encode(), headers=headers, timeout=30)
        assert uploaded.status_code == 202, uploaded.text
        queue_ids.append(uploaded.json()["queue_id"])
    drained = manage(embedded.env, "drain_spool")
    assert drained.returncode == 0, drained.stderr[-3000:]
    with sqlite3.connect(embedded.database) as db:
        uids = [
            db.execute("SELECT uid FROM mailboxes_message WHERE trace_id = ?", [queue_id]).fetchone()
            for queue_id in queue_ids
        ]
    assert None not in uids, drained.stderr[-3000:]  # every upload became a row
    assert uids[0][0] < uids[1][0], uids  # in order, each its own UID


def test_it_queues_sent_mail_on_the_embedded_database_and_counts_it(embedded: Embedded) -> None:
    """The send API on SQLite: the rate and quota counters (two statements there, one CTE on
    PostgreSQL) and the queued message, twice, so the counter's upsert path runs too."""
    headers = {"Authorization": f"Bearer {embedded.demo['api_key']}"}
    body = {"from": embedded.demo["mailbox"], "to": ["someone@example.com"], "subject": "hi", "text": "hello"}
    for _ in range(2):
        sent = requests.post(f"{embedded.base_url}/api/v1/messages/send", json=body, headers=headers, timeout=30)
        assert sent.status_code == 202, sent.text
    with sqlite3.connect(embedded.database) as db:
        counted = dict(db.execute("SELECT period, messages FROM outbound_sendcounter").fetchall())
    assert counted == {"minute": 2, "day": 2}
    # A worker's delivery on SQLite records its attempt (a smarthost that refuses the
    # connection: deferred), where a PostgreSQL-only statement once failed every outcome and
    # left the message queued, to be sent again at each lease's end.
    closed = f"smtp://127.0.0.1:{free_port()}"
    delivered = manage(
        {**embedded.env, "OUTBOUND_URL": closed},
        "shell",
        "-c",
        "from outbound.models import OutboundMessage\n"
        "from outbound.tasks import message_deliver\n"
        "for pk in OutboundMessage.objects.values_list('pk', flat=True): message_deliver(str(pk))",
    )
    assert delivered.returncode == 0, delivered.stderr[-3000:]
    with sqlite3.connect(embedded.database) as db:
        states = db.execute("SELECT state, attempts FROM outbound_recipient").fetchall()
    assert states and all(state != "queued" and attempts >= 1 for state, attempts in states), states
