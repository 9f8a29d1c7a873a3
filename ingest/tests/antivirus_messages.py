"""Messages carrying the EICAR test file in the ways mail carries malware (antivirus tests)."""

from __future__ import annotations

import base64
import io
import zipfile

from mailplatform.testing_clamd import EICAR

HEAD = (
    "From: Mallory <mallory@sender.example>\r\nTo: inbox@acme.example.test\r\n"
    "Subject: {subject}\r\nMIME-Version: 1.0\r\n"
)


def _b64(data: bytes) -> str:
    return base64.encodebytes(data).decode().replace("\n", "\r\n")


def clean_message(subject: str = "Quarterly figures") -> bytes:
    return (HEAD.format(subject=subject) + "Content-Type: text/plain\r\n\r\nNothing to see.\r\n").encode()


def plain_attachment() -> bytes:
    """EICAR as a 7bit attachment: its bytes are in the message as sent."""
    return (
        HEAD.format(subject="plain attachment") + "Content-Type: multipart/mixed; boundary=outer\r\n\r\n"
        "--outer\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        '--outer\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="eicar.com"\r\n'
        "Content-Transfer-Encoding: 7bit\r\n\r\n" + EICAR.decode() + "\r\n--outer--\r\n"
    ).encode()


def nested_base64() -> bytes:
    """EICAR base64-encoded two multiparts deep: only a MIME decoder finds it."""
    return (
        HEAD.format(subject="nested") + "Content-Type: multipart/mixed; boundary=outer\r\n\r\n"
        "--outer\r\nContent-Type: multipart/alternative; boundary=inner\r\n\r\n"
        "--inner\r\nContent-Type: text/plain\r\n\r\nHello.\r\n"
        "--inner\r\nContent-Type: multipart/related; boundary=deepest\r\n\r\n"
        "--deepest\r\nContent-Type: text/html\r\n\r\n<p>Hello.</p>\r\n"
        "--deepest\r\nContent-Type: application/x-msdownload\r\n"
        'Content-Disposition: attachment; filename="setup.exe"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n" + _b64(EICAR) + "--deepest--\r\n--inner--\r\n--outer--\r\n"
    ).encode()


def zipped() -> bytes:
    """EICAR deflated inside a zip, base64 in the message: found only by unpacking it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("invoice/readme.com", EICAR)
    return (
        HEAD.format(subject="zipped") + "Content-Type: multipart/mixed; boundary=outer\r\n\r\n"
        "--outer\r\nContent-Type: text/plain\r\n\r\nInvoice attached.\r\n"
        '--outer\r\nContent-Type: application/zip\r\nContent-Disposition: attachment; filename="invoice.zip"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n" + _b64(buffer.getvalue()) + "--outer--\r\n"
    ).encode()


def oversized(size: int) -> bytes:
    """A clean message of about ``size`` bytes (base64 lines)."""
    filler = _b64(b"\x00" * (size * 3 // 4))
    return (
        HEAD.format(subject="large")
        + "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + filler
    ).encode()


INFECTED = {"plain_attachment": plain_attachment, "nested_base64": nested_base64, "zipped": zipped}
