"""Blob storage for parsed parts: content-addressed puts, reads, signed URLs, deletes.

The raw message keys are written by ingest (``raw/<tenant>/<yyyy>/<mm>/<dd>/<sha256>.eml``);
attachments go under ``att/<tenant>/<sha256>``. Downloads never stream through the app on
S3: the URL is presigned for ``SIGNED_URL_TTL`` seconds. On the local blob folder the URL
points at :func:`mailboxes.views.blob_download` with a signed, expiring token.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from urllib.parse import quote

from django.conf import settings
from django.core import signing
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, Storage, storages
from django.urls import reverse

from mailboxes.headers import filename_sanitize

_SALT = "mailboxes.blob-download"


def blob_storage() -> Storage:
    return storages["blobs"]


def attachment_key(tenant_id: object, sha256: str) -> str:
    return f"att/{tenant_id}/{sha256}"


def blob_put(key: str, content: bytes, storage: Storage | None = None) -> None:
    """Store ``content`` under exactly ``key``; repeating it is harmless (content-addressed)."""
    storage = storage or blob_storage()
    if isinstance(storage, FileSystemStorage):
        _local_put(storage, key, content)
        return
    if not getattr(storage, "file_overwrite", False) and storage.exists(key):
        return
    name = storage.save(key, ContentFile(content))
    if name != key:
        raise RuntimeError(f"blob storage renamed {key} to {name}")


def _local_put(storage: FileSystemStorage, key: str, content: bytes) -> None:
    """The local blob folder: written whole under a temporary name, then linked in under
    ``key`` at once. Its own save() writes into the final name while others may read it, and
    saves under a new name when the key appeared between exists() and save() (two drainers
    of the same message): here a key already there is success, since keys are content-addressed.

    Plain system calls (no ``tempfile.mkstemp`` name search, no file object, the folder made
    only when the first open finds it missing): this runs once per attachment of every message.
    """
    final = storage.path(key)
    if os.path.exists(final):
        return
    folder = os.path.dirname(final)
    temporary = os.path.join(folder, f".put-{secrets.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(temporary, flags, 0o600)
    except FileNotFoundError:
        os.makedirs(folder, mode=storage.directory_permissions_mode or 0o700, exist_ok=True)
        fd = os.open(temporary, flags, 0o600)
    try:
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.chmod(fd if os.chmod in os.supports_fd else temporary, storage.file_permissions_mode or 0o600)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(temporary, final)
    finally:
        os.unlink(temporary)


def blob_get(key: str, storage: Storage | None = None) -> bytes:
    storage = storage or blob_storage()
    if isinstance(storage, FileSystemStorage):
        # The local folder read directly, not through its File object (once per parsed message).
        with open(storage.path(key), "rb") as handle:
            return handle.read()
    with storage.open(key, "rb") as handle:
        return bytes(handle.read())


def blob_exists(key: str, storage: Storage | None = None) -> bool:
    return (storage or blob_storage()).exists(key)


def blob_delete(key: str, storage: Storage | None = None) -> None:
    (storage or blob_storage()).delete(key)


def download_filename(filename: str) -> str:
    """The name a download is offered under: no control characters or path separators."""
    return filename_sanitize(filename) or "download"


def _disposition(filename: str, inline: bool) -> str:
    # RFC 6266 section 4.3 with an RFC 8187 filename* for non-ASCII names. The name is cleaned
    # here too, not only at parse time: a CR or LF would split the header (a 500, or worse).
    kind = "inline" if inline else "attachment"
    name = download_filename(filename)
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "'")
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


def blob_signed_url(key: str, *, filename: str, content_type: str, inline: bool = False) -> str:
    """A download URL valid for ``SIGNED_URL_TTL`` seconds."""
    storage = blob_storage()
    disposition = _disposition(filename, inline)
    # Content types that a browser could run are served as octet-stream.
    safe_type = content_type if content_type.startswith(("image/", "text/plain", "application/pdf")) else ""
    safe_type = safe_type or ("message/rfc822" if key.endswith(".eml") else "application/octet-stream")
    if hasattr(storage, "bucket_name"):
        return str(
            storage.url(  # type: ignore[call-arg]  # S3Storage.url takes these; Storage.url does not
                key,
                parameters={"ResponseContentDisposition": disposition, "ResponseContentType": safe_type},
                expire=settings.SIGNED_URL_TTL,
            )
        )
    token = signing.dumps({"k": key, "f": filename, "t": safe_type, "i": inline}, salt=_SALT, compress=True)
    return f"{settings.BASE_URL}{reverse('blob-download', kwargs={'token': token})}"


def blob_token_read(token: str) -> dict[str, object]:
    """The payload of a local download token; raises ``signing.BadSignature`` when invalid or expired."""
    return dict(signing.loads(token, salt=_SALT, max_age=settings.SIGNED_URL_TTL))


def disposition(filename: str, inline: bool) -> str:
    return _disposition(filename, inline)


def blob_chunks(key: str, *, chunk_size: int = 64 * 1024, storage: Storage | None = None) -> Iterator[bytes]:
    """The object's bytes in chunks, never the whole of it in memory (IMAP/POP3 bodies).

    On S3 this is one streaming GET (django-storages' file object would buffer the object).
    """
    storage = storage or blob_storage()
    bucket = getattr(storage, "bucket", None)
    if bucket is not None:
        body = bucket.Object(storage._normalize_name(key)).get()["Body"]  # type: ignore[attr-defined]
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()
        return
    with storage.open(key, "rb") as handle:
        while chunk := handle.read(chunk_size):
            yield bytes(chunk)
