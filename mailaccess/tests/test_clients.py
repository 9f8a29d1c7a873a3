"""Real mail clients against the servers: fetchmail and getmail6 pull byte-identical messages
over IMAP and POP3; mutt, driven under tmux, opens the mailbox and reads a message."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import pytest

from mailaccess.server import ServerThread
from mailboxes.models import Message
from mailboxes.tests.helpers import fixture_bytes, message_deliver, simple_message

pytestmark = pytest.mark.django_db(transaction=True)


def _crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/install-test-servers.sh (make test-tools does)")
    return path


def _messages(world: Any) -> list[bytes]:
    raws = [
        simple_message("Plain one"),
        _crlf(fixture_bytes("nested_multipart.eml")),
        simple_message("Dots", body="a\r\n.leading dot\r\n..two\r\n."),
    ]
    for raw in raws:
        message_deliver(world.mailbox, raw)
    return raws


def _lf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n")


@pytest.mark.parametrize("protocol", ["IMAP", "POP3"])
def test_it_serves_fetchmail_byte_identical_messages(
    protocol: str, imap_server: ServerThread, pop3_server: ServerThread, world: Any, tmp_path: Path
) -> None:
    raws = _messages(world)
    port = imap_server.port if protocol == "IMAP" else pop3_server.port
    out = tmp_path / "out"
    out.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set invisible\nset no bouncemail\n"
        f"poll 127.0.0.1 service {port} protocol {protocol} auth password\n"
        f'  user "{world.mailbox.address}" password "{world.owner_key}" is root here\n'
        "  keep fetchall no rewrite sslproto ''\n"
        f"  mda \"/bin/sh -c 'cat > {out}/$$'\"\n"
    )
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(tmp_path), "FETCHMAILHOME": str(tmp_path)}
    result = subprocess.run(
        [_tool("fetchmail"), "-f", str(rc), "--nodetach", "--nosyslog", "-v"],
        env=env, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    pulled = sorted(path.read_bytes() for path in out.iterdir())
    assert sorted(_lf(raw) for raw in raws) == sorted(_lf(body) for body in pulled)


@pytest.mark.parametrize("protocol", ["IMAP", "POP3"])
def test_it_serves_getmail_the_stored_messages(
    protocol: str, imap_server: ServerThread, pop3_server: ServerThread, world: Any, tmp_path: Path
) -> None:
    raws = _messages(world)
    port = imap_server.port if protocol == "IMAP" else pop3_server.port
    out = tmp_path / "out"
    out.mkdir()
    retriever = "SimpleIMAPRetriever" if protocol == "IMAP" else "SimplePOP3Retriever"
    (tmp_path / "getmailrc").write_text(
        f"[retriever]\ntype = {retriever}\nserver = 127.0.0.1\nport = {port}\n"
        f"username = {world.mailbox.address}\npassword = {world.owner_key}\n"
        + ('mailboxes = ("INBOX",)\nrecord_mailbox = false\n' if protocol == "IMAP" else "")
        + "[destination]\ntype = MDA_external\npath = /bin/sh\n"
        f'arguments = ("-c", "cat > {out}/$$")\nallow_root_commands = true\n'
        "[options]\nread_all = true\ndelete = false\nreceived = false\ndelivered_to = false\n"
        "message_log_verbose = false\nverbose = 0\n"
    )
    result = subprocess.run(
        [_tool("getmail"), f"--getmaildir={tmp_path}", "--rcfile=getmailrc"],
        capture_output=True, timeout=20, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    pulled = sorted(path.read_bytes() for path in out.iterdir())
    # getmail writes a Return-Path line first (the envelope sender; empty for these), then the
    # message as Python's email generator re-renders what it parsed: what it would write for
    # exactly our bytes is that same round trip.
    bodies = sorted(_lf(body.split(b"\n", 1)[1] if body.startswith(b"Return-Path:") else body) for body in pulled)
    expected = [BytesParser().parsebytes(raw).as_bytes(policy=compat32.clone(linesep="\n")) for raw in raws]
    assert bodies == sorted(_lf(raw) for raw in expected)


def test_it_lets_mutt_open_the_mailbox_and_read_a_message(
    imap_server: ServerThread, world: Any, tmp_path: Path
) -> None:
    message_deliver(world.mailbox, simple_message("Hello from mutt", body="The body mutt shows"))
    tmux, mutt = _tool("tmux"), _tool("mutt")
    muttrc = tmp_path / "muttrc"
    muttrc.write_text(
        f'set folder="imap://{world.mailbox.address.replace("@", "%40")}@127.0.0.1:{imap_server.port}/"\n'
        f'set spoolfile="+INBOX"\nset imap_pass="{world.owner_key}"\nset ssl_starttls=no\nset ssl_force_tls=no\n'
        "set imap_passive=no\nset mail_check=1\nset timeout=1\nset pager_stop=yes\nset header_cache=''\n"
        "set record=''\nset sort=date\nset move=no\nset confirmappend=no\n"
    )
    socket_name = f"mp-mutt-{os.getpid()}"
    env = {**os.environ, "HOME": str(tmp_path), "TERM": "xterm", "LANG": "C.UTF-8"}
    base = [tmux, "-L", socket_name]
    subprocess.run([*base, "new-session", "-d", "-x", "150", "-y", "40", f"{mutt} -n -F {muttrc}"], env=env, check=True)
    try:

        def screen() -> str:
            return subprocess.run([*base, "capture-pane", "-p"], capture_output=True, text=True, env=env).stdout

        def wait_for(text: str) -> str:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                shown = screen()
                if text in shown:
                    return shown
                time.sleep(0.2)
            raise AssertionError(f"mutt never showed {text!r}:\n{screen()}")

        wait_for("Hello from mutt")  # the index of INBOX
        subprocess.run([*base, "send-keys", "Enter"], env=env, check=True)
        wait_for("The body mutt shows")  # the pager
        subprocess.run([*base, "send-keys", "q", "$"], env=env, check=True)  # back to the index, sync
        deadline = time.monotonic() + 10
        while not Message.objects.get(mailbox=world.mailbox).is_read and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        subprocess.run([*base, "kill-server"], env=env, check=False)
    assert Message.objects.get(mailbox=world.mailbox).is_read  # mutt's \Seen came back through STORE
