"""SMTP submission (RFC 6409) for tenants' outgoing mail: ``runsmtp --submission``.

STARTTLS first (RFC 3207: every command but EHLO, STARTTLS, NOOP and QUIT answers ``530``
before it), then AUTH PLAIN or LOGIN (RFC 4954) with an API key holding ``messages:send`` as
the password (the user name is not checked: the key names its tenant). The message then goes
through the same checks and the same queue as ``POST /api/v1/messages/send``; ``250`` only
once it is committed. The certificate is SMTP_TLS_CERT_FILE's, or without one a self-signed
certificate made once under DATA_DIR (development).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, TLSSetupException
from django.conf import settings
from django.db import close_old_connections

from mailplatform.hostnames import greeting_hostname
from outbound import services
from outbound.models import OutboundMessage
from tenants.access import Permission, Principal

logger = logging.getLogger(__name__)

_REFUSAL_REPLIES = {
    "domain_not_verified": "550 5.7.1",
    "sender_not_allowed": "550 5.7.1",
    "rate_limited": "451 4.7.1",
    "quota_exceeded": "452 4.2.2",
    "message_too_large": "552 5.3.4",
    "too_many_recipients": "452 4.5.3",
    "no_recipients": "554 5.5.1",
    "invalid_message": "550 5.6.0",
}


def tls_context() -> ssl.SSLContext:
    cert, key = settings.SMTP_TLS_CERT_FILE, settings.SMTP_TLS_KEY_FILE
    if not cert:
        cert, key = _self_signed(Path(settings.DATA_DIR) / "submission-tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def _self_signed(folder: Path) -> tuple[str, str]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    if cert.exists() and key.exists():
        return str(cert), str(key)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, settings.SMTP_HOSTNAME)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(settings.SMTP_HOSTNAME)]), critical=False)
        .sign(private, hashes.SHA256())
    )
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key.chmod(0o600)
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return str(cert), str(key)


class Submission:
    """The aiosmtpd handler and authenticator; database work in a small thread pool."""

    def __init__(self, threads: int = 8) -> None:
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="submission")

    # --- AUTH ------------------------------------------------------------------------
    async def handle_exception(self, error: Exception) -> str:
        """A client that gives up on our certificate is not an error of ours: one line, no traceback."""
        if isinstance(error, TLSSetupException):
            logger.info("submission: a client's TLS handshake failed (%s)", error.__cause__ or "closed")
        else:
            logger.error("submission session error: %s", type(error).__name__, exc_info=error)
        return "451 4.3.0 Error: try again later"

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        ip = session.peer[0] if isinstance(session.peer, tuple) else None
        secret = data.password.decode("utf-8", "replace").strip()
        # aiosmtpd calls this synchronously: the look-up runs in a thread (Django's ORM is not
        # for the event loop's thread).
        principal = self.executor.submit(self._principal, secret, ip).result(timeout=10)
        if principal is None:
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=principal)

    @staticmethod
    def _principal(secret: str, ip: str | None) -> Principal | None:
        from tenants.access import principal_ensure_usable
        from tenants.services import KeyRejected, api_key_authenticate

        close_old_connections()
        try:
            principal = Principal.for_api_key(api_key_authenticate(secret=secret, ip=ip))
            principal_ensure_usable(principal, ip)
        except (KeyRejected, PermissionError, Exception) as exc:  # any refusal is "535"
            logger.warning("submission: authentication refused from %s: %s: %s", ip, type(exc).__name__, exc)
            return None
        return principal if principal.has_perm(Permission.MESSAGES_SEND) else None

    # --- The transaction -------------------------------------------------------------
    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= settings.OUTBOUND_MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        principal = session.auth_data
        if not isinstance(principal, Principal):
            return "530 5.7.0 Authentication required"
        content = bytes(envelope.original_content or b"")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, self._queue, principal, content, list(envelope.rcpt_tos))
        except Exception:
            logger.exception("submission: queueing failed")
            return "451 4.3.0 Could not queue the message, try again later"

    @staticmethod
    def _queue(principal: Principal, content: bytes, recipients: list[str]) -> str:
        close_old_connections()
        try:
            final, sender, _ = services.raw_envelope(content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
            queued = services.message_queue(
                principal=principal,
                content=final,
                from_address=sender,
                recipients=recipients,
                source=OutboundMessage.Source.SUBMISSION,
            )
        except services.SendRefused as refusal:
            return f"{_REFUSAL_REPLIES.get(refusal.code, '554 5.7.1')} {refusal}"
        except Exception as exc:
            from django.core.exceptions import PermissionDenied, ValidationError

            if isinstance(exc, ValidationError | PermissionDenied):
                return f"550 5.7.1 {' '.join(getattr(exc, 'messages', [str(exc)]))[:200]}"
            raise
        return f"250 2.0.0 Ok: queued as {queued.message.pk}"


class _AiosmtpdNoise(logging.Filter):
    """aiosmtpd warns on every successful AUTH that its own Session.login_data is deprecated."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Session.login_data is deprecated" not in record.getMessage()


def server_factory(handler: Submission, context: ssl.SSLContext) -> SMTP:
    return SMTP(
        handler,
        hostname=greeting_hostname(),
        ident="mailplatform submission",
        tls_context=context,
        require_starttls=True,
        auth_required=True,
        auth_require_tls=True,
        authenticator=handler.authenticate,
        data_size_limit=settings.INGEST_MAX_MESSAGE_SIZE,
        decode_data=False,
    )


def serve(host: str, port: int) -> None:
    """Listen until interrupted (SIGINT/SIGTERM)."""
    import signal

    # aiosmtpd logs every command at INFO (addresses are personal data; our own lines say
    # what was queued), and one line per AUTH about its own deprecated attribute.
    mail_log = logging.getLogger("mail.log")
    if settings.LOG_LEVEL != "DEBUG":
        mail_log.setLevel(logging.WARNING)
    mail_log.addFilter(_AiosmtpdNoise())
    handler, context = Submission(), tls_context()
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(lambda: server_factory(handler, context), host, port))
    logger.info("submission listening on %s:%s (STARTTLS required, AUTH with an API key)", host, port)
    print(f"submission listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.run_until_complete(stop.wait())
    server.close()
    loop.run_until_complete(server.wait_closed())
    handler.executor.shutdown(wait=True)
    loop.close()


__all__ = ["Submission", "serve", "server_factory", "tls_context"]
