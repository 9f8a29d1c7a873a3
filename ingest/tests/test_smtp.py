"""SMTP conversations over real sockets (smtplib and raw pipelined writes), with real S3."""

from __future__ import annotations

import errno
import smtplib
import socket
import time
from typing import Any

import pytest
from django.core.files.storage import storages

from audit.models import Event
from ingest.directory import RecipientDirectory
from ingest.services import spool_drain
from ingest.spool import Spool
from ingest.tests.conftest import raw_session
from mailboxes.models import Message
from mailboxes.tests.factories import MailboxFactory
from tenants.access import Principal
from tenants.models import Domain, Tenant

pytestmark = pytest.mark.django_db

BODY = b"From: a@example.org\r\nSubject: hello\r\n\r\nHello.\r\n"


def client(server: Any) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
    smtp.ehlo("client.example.org")
    return smtp


def rcpt(server: Any, address: str) -> tuple[int, bytes]:
    with client(server) as smtp:
        smtp.mail("a@example.org")
        return smtp.rcpt(address)


def test_it_answers_250_only_once_the_message_is_in_spool_new(world: Any, smtp_server: Any) -> None:
    server = smtp_server()
    with client(server) as smtp:
        code, text = smtp.ehlo("client.example.org")
        assert b"SIZE 26214400" in text and b"PIPELINING" in text
        smtp.mail("sender@example.org")
        smtp.rcpt("inbox@acme.example.test")
        code, text = smtp.data(BODY)
    assert code == 250
    assert text.startswith(b"2.0.0 Ok: queued as ")
    queue_id = text.decode().rsplit(" ", 1)[1]
    assert server.spool.pending() == [queue_id]
    assert list(server.spool.tmp.iterdir()) == []
    envelope, content = server.spool.read(queue_id)
    assert content == BODY
    assert envelope.mail_from == "sender@example.org"
    assert envelope.helo == "client.example.org"
    assert envelope.remote_ip == "127.0.0.1"
    assert [r.mailbox_id for r in envelope.recipients] == [str(world.mailbox.pk)]


def test_it_drains_into_s3_with_a_message_and_the_events(world: Any, smtp_server: Any) -> None:
    server = smtp_server()
    with client(server) as smtp:
        smtp.sendmail("sender@example.org", ["inbox+news+weekly@acme.example.test"], BODY)
    assert spool_drain(server.spool) == {"stored": 1}
    message = Message.objects.get()
    assert (message.mailbox, message.tenant, message.state) == (world.mailbox, world.tenant, "stored")
    assert message.rcpt == "inbox+news+weekly@acme.example.test"
    assert message.tags == ["news", "weekly"]
    assert message.size == len(BODY) and message.mail_from == "sender@example.org"
    assert message.storage_key.startswith(f"raw/{world.tenant.pk}/") and message.storage_key.endswith(
        f"/{message.sha256}.eml"
    )
    with storages["blobs"].open(message.storage_key) as handle:
        assert handle.read() == BODY
    events = Event.objects.filter(message_id=message.pk).order_by("seq")
    assert [(e.type, e.trace_id, e.mailbox_id) for e in events] == [
        ("ingest.received", message.trace_id, world.mailbox.pk),
        ("objectstore.uploaded", message.trace_id, world.mailbox.pk),
    ]
    assert server.spool.pending() == []


def test_it_gives_each_rcpt_the_reply_code_that_fits(world: Any, smtp_server: Any) -> None:
    mx_lost = Domain.objects.create(tenant=world.tenant, name="lost.example.test", state="mx_lost")
    suspended = Domain.objects.create(tenant=world.tenant, name="gone.example.test", state="suspended")
    Domain.objects.create(tenant=world.tenant, name="pending.example.test", state="pending")
    MailboxFactory(domain=mx_lost, local_part="box")
    MailboxFactory(domain=suspended, local_part="box")
    server = smtp_server()
    assert rcpt(server, "inbox@acme.example.test") == (250, b"2.1.5 Ok")
    assert rcpt(server, "INBOX@Acme.Example.Test") == (250, b"2.1.5 Ok")
    assert rcpt(server, "nobody@acme.example.test")[0:1] == (550,)
    assert rcpt(server, "nobody@acme.example.test")[1].startswith(b"5.1.1")
    assert rcpt(server, "someone@not-ours.example")[1].startswith(b"5.7.1")
    assert rcpt(server, "box@gone.example.test")[:1] == (550,)
    assert rcpt(server, "box@gone.example.test")[1].startswith(b"5.7.1")
    assert rcpt(server, "box@lost.example.test")[0] == 451
    assert rcpt(server, "box@lost.example.test")[1].startswith(b"4.7.1")
    assert rcpt(server, "box@pending.example.test")[0] == 550
    # RFC 5321 section 4.5.1: postmaster is accepted for every domain we receive for.
    assert rcpt(server, "postmaster@acme.example.test")[0] == 250
    assert rcpt(server, "postmaster@outsider.example.test")[0] == 250


def test_it_refuses_a_suspended_tenant_with_550(world: Any, smtp_server: Any) -> None:
    Tenant.objects.filter(pk=world.tenant.pk).update(status=Tenant.Status.SUSPENDED)
    server = smtp_server()
    code, text = rcpt(server, "inbox@acme.example.test")
    assert (code, text[:5]) == (550, b"5.7.1")
    assert rcpt(server, "theirs@outsider.example.test")[0] == 250


def test_it_drops_or_catches_unknown_users_by_domain_policy(world: Any, smtp_server: Any) -> None:
    Domain.objects.filter(pk=world.domain.pk).update(recipient_policy="drop")
    catch = Domain.objects.create(
        tenant=world.tenant, name="catch.example.test", state="verified", recipient_policy="catch_all"
    )
    catch_box = MailboxFactory(domain=catch, local_part="all", is_catch_all=True)
    server = smtp_server()
    with client(server) as smtp:
        assert smtp.sendmail("a@example.org", ["nobody@acme.example.test"], BODY) == {}
        assert smtp.sendmail("a@example.org", ["whoever@catch.example.test"], BODY) == {}
    assert spool_drain(server.spool) == {"stored": 1}
    assert Message.objects.get().mailbox == catch_box


def test_it_answers_452_to_the_101st_recipient(world: Any, smtp_server: Any) -> None:
    server = smtp_server()
    with client(server) as smtp:
        smtp.mail("a@example.org")
        codes = [smtp.rcpt(f"inbox+{n}@acme.example.test")[0] for n in range(100)]
        code, text = smtp.rcpt("inbox+101@acme.example.test")
        assert codes == [250] * 100
        assert (code, text[:5]) == (452, b"4.5.3")
        assert smtp.data(BODY)[0] == 250
    assert spool_drain(server.spool) == {"stored": 1}
    assert Message.objects.count() == 1  # 100 tags of one mailbox: one Message


def test_it_handles_a_fully_pipelined_transaction(world: Any, smtp_server: Any) -> None:
    server = smtp_server()
    payload = (
        b"EHLO pipe.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<inbox@acme.example.test>\r\n"
        b"RCPT TO:<sibling@acme.example.test>\r\nRCPT TO:<nobody@acme.example.test>\r\nDATA\r\n"
        b"Subject: p\r\n\r\n..dot-stuffed\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<inbox@acme.example.test>\r\nDATA\r\n"
        b".\r\nQUIT\r\n"
    )
    lines = raw_session(server.port, payload, expect=20)
    codes = [line[:3] for line in lines if line[3:4] == " "]
    assert codes == ["220", "250", "250", "250", "250", "550", "354", "250", "250", "250", "354", "250", "221"]
    first, second = (server.spool.read(q) for q in server.spool.pending())
    assert first[1] == b"Subject: p\r\n\r\n.dot-stuffed\r\n"
    assert len(first[0].recipients) == 2
    assert second[1] == b"" and second[0].mail_from == ""


def test_it_stores_8bit_nul_bare_lf_and_long_lines_byte_for_byte(world: Any, smtp_server: Any) -> None:
    server = smtp_server()
    body = b"Subject: caf\xc3\xa9\r\n\r\n\xff\xfe\x00NUL\x00\r\nbare\nLF\nlines\n.not-the-end\n" + b"x" * 5000 + b"\r\n"
    lines = raw_session(
        server.port,
        b"EHLO x\r\nMAIL FROM:<a@example.org> BODY=8BITMIME\r\nRCPT TO:<inbox@acme.example.test>\r\nDATA\r\n"
        + body
        + b".\r\nQUIT\r\n",
        expect=11,
    )
    assert any(line.startswith("250 2.0.0 Ok: queued as") for line in lines)
    assert spool_drain(server.spool) == {"stored": 1}
    message = Message.objects.get()
    with storages["blobs"].open(message.storage_key) as handle:
        assert handle.read() == body  # a bare LF "." line does not end the data (no smuggling)


def test_it_refuses_a_message_over_size_with_552_and_keeps_the_session(world: Any, smtp_server: Any) -> None:
    server = smtp_server(max_message_size=4096)
    with client(server) as smtp:
        assert b"SIZE 4096" in smtp.ehlo_resp
        code, text = smtp.mail("a@example.org", ["SIZE=5000"])
        assert (code, text[:5]) == (552, b"5.3.4")
        smtp.rset()
        smtp.mail("a@example.org")
        smtp.rcpt("inbox@acme.example.test")
        code, text = smtp.data(b"Subject: big\r\n\r\n" + b"y" * 6000 + b"\r\n")
        assert (code, text[:5]) == (552, b"5.3.4")
        assert smtp.sendmail("a@example.org", ["inbox@acme.example.test"], BODY) == {}
    assert len(server.spool.pending()) == 1


def test_it_answers_421_when_a_slow_sender_hits_the_deadline(world: Any, smtp_server: Any) -> None:
    server = smtp_server(connection_deadline=1.0)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"EHLO slow\r\n")
        received = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
            sock.sendall(b"NOOP\r\n")
            time.sleep(0.2)
    assert b"421 4.4.2" in received
    assert time.monotonic() - started < 4


def test_it_answers_421_to_an_idle_client_after_the_command_timeout(world: Any, smtp_server: Any) -> None:
    server = smtp_server(command_timeout=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert received.startswith(b"220 ") and b"421 4.4.2" in received


def test_it_answers_421_beyond_the_connections_per_ip(world: Any, smtp_server: Any) -> None:
    server = smtp_server(connections_per_ip=1)
    with client(server), socket.create_connection(("127.0.0.1", server.port), timeout=5) as second:
        assert second.recv(4096).startswith(b"421 4.7.0")


def test_it_rate_limits_per_ip_and_per_tenant_with_451(world: Any, smtp_server: Any) -> None:
    per_ip = smtp_server(rate_per_ip=2)
    with client(per_ip) as smtp:
        assert smtp.mail("a@example.org")[0] == 250
        smtp.rset()
        assert smtp.mail("a@example.org")[0] == 250
        smtp.rset()
        code, text = smtp.mail("a@example.org")
        assert (code, text[:5]) == (451, b"4.7.1")
    per_tenant = smtp_server(rate_per_tenant=1)
    with client(per_tenant) as smtp:
        assert smtp.sendmail("a@example.org", ["inbox@acme.example.test"], BODY) == {}
        smtp.mail("a@example.org")
        code, text = smtp.rcpt("sibling@acme.example.test")
        assert (code, text[:5]) == (451, b"4.7.1")
        assert smtp.rcpt("theirs@outsider.example.test")[0] == 250  # another tenant's budget


def test_it_answers_452_when_the_spool_is_below_its_low_water_mark(world: Any, smtp_server: Any) -> None:
    server = smtp_server(spool_low_water=2**62)
    with client(server) as smtp:
        code, text = smtp.mail("a@example.org")
    assert (code, text[:5]) == (452, b"4.3.1")


class FaultySpool(Spool):
    """The real spool with a fault injected into the write (a full or failing disk)."""

    error = errno.ENOSPC

    def write_tmp(self, envelope: Any, content: bytes) -> Any:
        path = self.tmp / envelope.queue_id
        path.write_bytes(content[:10])  # half-written, as a full disk leaves it
        raise OSError(self.error, "injected")


@pytest.mark.parametrize(("error", "reply"), [(errno.ENOSPC, b"4.3.1"), (errno.EIO, b"4.3.0")])
def test_it_answers_452_or_451_never_500_when_the_disk_fails(
    world: Any, smtp_server: Any, tmp_path: Any, error: int, reply: bytes
) -> None:
    spool = FaultySpool(tmp_path / "faulty")
    spool.error = error
    server = smtp_server(spool=spool)
    with client(server) as smtp:
        smtp.mail("a@example.org")
        smtp.rcpt("inbox@acme.example.test")
        code, text = smtp.data(BODY)
        assert (code // 100, text[:5]) == (4, reply)
        assert smtp.noop()[0] == 250  # the session goes on
    assert spool.pending() == []


def test_it_answers_451_not_500_when_the_handler_raises(world: Any, smtp_server: Any) -> None:
    class Broken(RecipientDirectory):
        def decide(self, address: str) -> Any:
            raise RuntimeError("secret internals")

    broken = Broken()
    assert broken.reload()
    server = smtp_server(directory=broken)
    code, text = rcpt(server, "inbox@acme.example.test")
    assert (code, text[:5]) == (451, b"4.3.0")
    assert b"secret" not in text


def test_it_answers_451_instead_of_rejecting_while_the_database_is_unreachable(world: Any, smtp_server: Any) -> None:
    never_loaded = smtp_server(directory=RecipientDirectory())
    assert rcpt(never_loaded, "inbox@acme.example.test")[:1] == (451,)
    stale = RecipientDirectory(max_staleness=0.0)
    assert stale.reload()
    time.sleep(0.01)
    server = smtp_server(directory=stale)
    assert rcpt(server, "inbox@acme.example.test")[0] == 250  # known: still accepted
    code, text = rcpt(server, "new-mailbox@acme.example.test")
    assert (code, text[:5]) == (451, b"4.3.0")  # unknown: not rejected on old data


def test_it_makes_one_blob_per_tenant_and_a_message_in_each_tenants_mailbox(
    world: Any, smtp_server: Any, s3_server: Any
) -> None:
    server = smtp_server()
    with client(server) as smtp:
        refused = smtp.sendmail(
            "a@example.org",
            ["inbox@acme.example.test", "sibling@acme.example.test", "theirs@outsider.example.test"],
            BODY,
        )
    assert refused == {}
    assert spool_drain(server.spool) == {"stored": 1}
    ours = Principal.system(world.tenant).scope(Message.objects.all())
    theirs = Principal.system(world.outsider_tenant).scope(Message.objects.all())
    assert {m.mailbox for m in ours} == {world.mailbox, world.sibling}
    assert [m.mailbox for m in theirs] == [world.outsider_mailbox]
    keys = {m.storage_key for m in Message.objects.all()}
    assert len(keys) == 2
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="raw/")
    names = {entry["Key"] for entry in listed.get("Contents", [])}
    assert keys <= names
    assert {key.split("/")[1] for key in keys} == {str(world.tenant.pk), str(world.outsider_tenant.pk)}


def test_it_answers_each_lmtp_recipient_after_data(world: Any, smtp_server: Any) -> None:
    Tenant.objects.filter(pk=world.outsider_tenant.pk).update(max_message_size=20)
    server = smtp_server(lmtp=True)
    lines = raw_session(
        server.port,
        b"LHLO lmtp.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<inbox@acme.example.test>\r\n"
        b"RCPT TO:<nobody@acme.example.test>\r\nRCPT TO:<theirs@outsider.example.test>\r\nDATA\r\n"
        + BODY
        + b".\r\nQUIT\r\n",
        expect=15,
    )
    final = [line for line in lines if line[3:4] == " "]
    assert [line[:3] for line in final] == ["220", "250", "250", "250", "550", "250", "354", "250", "552", "221"]
    assert final[7].startswith("250 2.0.0 Ok: queued as")
    assert spool_drain(server.spool) == {"stored": 1}
    assert [m.mailbox for m in Message.objects.all()] == [world.mailbox]
    assert rcpt_helo_refused(server)


def rcpt_helo_refused(server: Any) -> bool:
    lines = raw_session(server.port, b"HELO x\r\nQUIT\r\n", expect=3)
    return lines[1].startswith("500")


def test_it_redrains_a_crashed_entry_without_duplicates(world: Any, smtp_server: Any) -> None:
    server = smtp_server()
    with client(server) as smtp:
        smtp.sendmail("a@example.org", ["inbox@acme.example.test", "theirs@outsider.example.test"], BODY)
    (queue_id,) = server.spool.pending()
    saved = (server.spool.new / queue_id).read_bytes()
    assert spool_drain(server.spool) == {"stored": 1}
    (server.spool.new / queue_id).write_bytes(saved)  # as if the crash came before the unlink
    assert spool_drain(server.spool) == {"duplicate": 1}
    assert Message.objects.count() == 2
    assert Event.objects.filter(type="ingest.received").count() == 2


def test_it_keeps_accepting_while_blob_storage_is_down_and_drains_when_it_returns(
    world: Any, smtp_server: Any, s3_server: Any
) -> None:
    from storages.backends.s3 import S3Storage

    from mailplatform.testing import free_port

    down = S3Storage(
        bucket_name=s3_server.bucket,
        endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens: a real outage
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region_name=s3_server.region,
        file_overwrite=True,
    )
    down.connection.meta.client.meta.config.retries = {"max_attempts": 1}
    server = smtp_server()
    with client(server) as smtp:
        for n in range(3):
            assert smtp.sendmail("a@example.org", [f"inbox+{n}@acme.example.test"], BODY) == {}
    assert spool_drain(server.spool, storage=down) == {"failed": 3}
    assert Message.objects.count() == 0 and len(server.spool.pending()) == 3
    assert spool_drain(server.spool) == {"stored": 3}
    assert Message.objects.count() == 3


def test_it_records_the_proxy_protocol_client_address(world: Any, smtp_server: Any) -> None:
    smtp_server.proxy_timeout = 5.0
    server = smtp_server()
    lines = raw_session(
        server.port,
        b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\nEHLO x\r\nMAIL FROM:<a@example.org>\r\n"
        b"RCPT TO:<inbox@acme.example.test>\r\nDATA\r\n" + BODY + b".\r\nQUIT\r\n",
        expect=12,
    )
    assert any(line.startswith("250 2.0.0") for line in lines)
    envelope, _ = server.spool.read(server.spool.pending()[0])
    assert envelope.remote_ip == "203.0.113.7"


def test_it_offers_starttls_and_records_it(world: Any, smtp_server: Any, tmp_path: Any) -> None:
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    smtp_server.tls_context = context
    server = smtp_server()
    with client(server) as smtp:
        assert smtp.has_extn("starttls")
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        assert smtp.starttls(context=insecure)[0] == 220
        smtp.ehlo("client.example.org")
        assert smtp.sendmail("a@example.org", ["inbox@acme.example.test"], BODY) == {}
    envelope, _ = server.spool.read(server.spool.pending()[0])
    assert envelope.tls is True


def test_it_rate_limits_an_ipv6_sender_by_its_64(world: Any, smtp_server: Any) -> None:
    """A sender rotating addresses within its /64 (RFC 8981) is one client to the per-IP rate."""
    import asyncio

    from aiosmtpd.smtp import Envelope, Session

    handler = smtp_server(rate_per_ip=2).handler

    async def mail(peer: str) -> str:
        session = Session(asyncio.get_running_loop())
        session.peer = (peer, 4025)
        return await handler.handle_MAIL(None, session, Envelope(), "a@example.org", [])

    def mail_from(peer: str) -> str:
        return asyncio.run(mail(peer))

    assert mail_from("2001:db8:5:1::1").startswith("250")
    assert mail_from("2001:db8:5:1::2").startswith("250")
    assert mail_from("2001:db8:5:1:abcd::3").startswith("451 4.7.1")
    assert mail_from("2001:db8:5:2::1").startswith("250")  # another /64
