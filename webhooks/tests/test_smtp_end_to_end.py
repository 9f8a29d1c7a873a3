"""SMTP to webhook, all real: runsmtp (with its drainer), a pipeline worker, a webhooks worker,
a receiver on loopback verifying every delivery with ``standardwebhooks``."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import time
from email.message import EmailMessage

import pytest

from mailplatform.testing import free_port
from webhooks.tests.conftest import make_endpoint, verify
from webhooks.tests.test_worker import ROOT, _database_url

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_it_turns_an_smtp_message_into_signed_webhooks_in_order(world, receiver, tmp_path):
    from mailplatform.celery import app

    app.control.purge()
    _, secret = make_endpoint(world, receiver.url(), event_types=["ingest.*", "objectstore.*", "indexer.*"])
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "SPOOL_DIR": str(tmp_path / "spool"),
        "INGEST_METRICS_PORT": "0",
        "INGEST_WORKERS": "1",
        "LOG_LEVEL": "WARNING",
    }
    worker = [sys.executable, "-m", "celery", "-A", "mailplatform", "worker", "-P", "threads", "-c", "4"]
    quiet = ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"]
    commands = [
        [sys.executable, "manage.py", "runsmtp", "--port", str(port), "--metrics-port", "0"],
        [*worker, "-Q", "ingest,parse,index", "-n", f"pipeline-{port}@%h", *quiet],
        [*worker, "-Q", "webhooks", "-n", f"webhooks-{port}@%h", *quiet],
    ]
    processes = [subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True) for command in commands]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=5) as probe:
                    probe.noop()
                break
            except OSError:
                assert time.monotonic() < deadline, "runsmtp did not start"
                time.sleep(0.2)
        message = EmailMessage()
        message["From"] = "sender@example.org"
        message["To"] = world.mailbox.address
        message["Subject"] = "Your code"
        message.set_content("Your verification code is 482913.\n")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.ehlo("client.example.org")
            smtp.mail("sender@example.org")
            smtp.rcpt(world.mailbox.address)
            code, reply = smtp.data(message.as_bytes())
        assert code == 250, reply
        queue_id = reply.decode().rsplit(" ", 1)[-1]
        received = receiver.wait_for(3, timeout=90)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        app.control.purge()
    bodies = [verify(secret, request) for request in received]
    assert [body["type"] for body in bodies] == ["ingest.received", "objectstore.uploaded", "indexer.indexed"]
    assert bodies[0]["data"]["queue_id"] == queue_id
    assert len({body["data"]["message"] for body in bodies}) == 1
    assert [request.headers["webhook-id"] for request in received] == [body["id"] for body in bodies]
    assert "482913" not in b"".join(request.body for request in received).decode()  # no message content
