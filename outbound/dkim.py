"""DKIM keys (RFC 6376, RFC 8463 for Ed25519): generating them, their TXT record, signing.

The private key is generated here and stored encrypted (tenants.crypto); only the public half
leaves, in the TXT record the tenant publishes at ``<selector>._domainkey.<domain>``.
Signing is dkimpy's, over the final bytes the worker hands to the next hop.
"""

from __future__ import annotations

import base64
import re
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

# Headers signed (RFC 6376 section 5.4.1 lists From as required; the rest are what receivers
# show or thread by). Each is signed once more than it appears (oversigning) so none can be
# added after us.
SIGNED_HEADERS = (
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"in-reply-to",
    b"references",
    b"reply-to",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
)


@lru_cache(maxsize=256)
def _openssl_key(n: int, e: int, d: int, p: int, q: int, dp: int, dq: int, qi: int) -> rsa.RSAPrivateKey:
    return rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, rsa.RSAPublicNumbers(e, n)).private_key()


def _rsa_sign(digest: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's RSASSA-PKCS1-v1_5 signature (RFC 8017 section 8.2.1) by OpenSSL: the same
    bytes, about ten times faster than its pure-Python modular exponentiation."""
    algorithm = hashes.SHA256() if digest.name == "sha256" else hashes.SHA1()  # noqa: S303 (rsa-sha1 verifiers)
    key = _openssl_key(
        private_key["modulus"],
        private_key["publicExponent"],
        private_key["privateExponent"],
        private_key["prime1"],
        private_key["prime2"],
        private_key["exponent1"],
        private_key["exponent2"],
        private_key["coefficient"],
    )
    return key.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))


dkim.RSASSA_PKCS1_v1_5_sign = _rsa_sign  # type: ignore[attr-defined]  # dkimpy resolves it at call time
# dkimpy parses the PEM (its own pure-Python ASN.1 reader) at every signature: once per key
# is enough, a sixth of a signature's CPU (the parsed numbers are only read).
dkim.parse_pem_private_key = lru_cache(maxsize=256)(dkim.parse_pem_private_key)  # type: ignore[attr-defined]

SELECTOR_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class KeyPair:
    private: str  # PEM (RSA) or base64 32-byte seed (Ed25519)
    public: str  # the TXT record's p= value


def key_pair_generate(algorithm: str) -> KeyPair:
    """A fresh key: RSA 2048 (SubjectPublicKeyInfo in p=) or Ed25519 (the raw 32 bytes, RFC 8463)."""
    if algorithm == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
        seed = private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return KeyPair(private=base64.b64encode(seed).decode(), public=base64.b64encode(public).decode())
    if algorithm != "rsa":
        raise ValueError(f"unknown DKIM algorithm {algorithm!r}")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return KeyPair(private=pem.decode(), public=base64.b64encode(der).decode())


def selector_new() -> str:
    """A selector nobody has used: ``mp`` + the date-free random part (rotation needs two)."""
    return f"mp{secrets.token_hex(4)}"


def record_matches(published: str, public_key: str) -> bool:
    """Whether a TXT value is our key: its ``p=`` tag equals ours (whitespace folded, RFC 6376 3.6.1)."""
    tags: dict[str, str] = {}
    for part in published.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = re.sub(r"\s+", "", value)
    return tags.get("v", "DKIM1") == "DKIM1" and tags.get("p") == public_key


def message_sign(content: bytes, *, domain: str, selector: str, algorithm: str, private_key: str) -> bytes:
    """``content`` with a DKIM-Signature header field in front (relaxed/relaxed)."""
    present = {
        name.strip().lower()
        for name in re.findall(rb"^([!-9;-~]+):", content.split(b"\r\n\r\n", 1)[0], flags=re.MULTILINE)
    }
    include = [name for name in SIGNED_HEADERS if name in present or name == b"from"]
    # Oversign: each signed header once more, so a header added in transit breaks the signature.
    include = include + include
    signature = dkim.sign(
        content,
        selector.encode(),
        domain.encode(),
        private_key.encode(),
        canonicalize=(b"relaxed", b"relaxed"),
        signature_algorithm=b"ed25519-sha256" if algorithm == "ed25519" else b"rsa-sha256",
        include_headers=include,
        linesep=b"\r\n",
    )
    return bytes(signature) + content
