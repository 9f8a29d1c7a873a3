"""Trust verdicts: SPF, DKIM, DMARC and ARC verified by us, and our own Authentication-Results.

What the sender wrote about itself proves nothing: a message may carry ``Authentication-Results:
mx.example; spf=pass`` written by anyone. So every inbound message is verified here, in the
parse step (never before the SMTP 250, unless a domain asked for the DMARC refusal at DATA,
:func:`dmarc_refusal`), with maintained libraries:

- SPF (RFC 7208): pyspf, on the connecting IP, HELO and MAIL FROM recorded in the spool
  envelope. Only mail that came to us over SMTP from the sender's side has that connection:
  mail from LMTP (an MTA in front of us), API upload and IMAP pull is marked
  ``sender_ip_known: false`` and has no SPF verdict rather than one made up from our own
  hop's address.
- DKIM (RFC 6376, RSA and ed25519 keys, RFC 8463): dkimpy, every signature on its own, with
  its domain, selector and algorithm; rsa-sha1 is not accepted (RFC 8301).
- DMARC (RFC 7489): the policy record of the From domain (or its organizational domain,
  section 6.6.3, found with the public suffix list authheaders ships), identifier alignment
  of SPF and of each passing DKIM signature (relaxed or strict, section 3.1), the policy
  that applies (``p``, or ``sp`` for a subdomain) and ``pct``.
- ARC (RFC 8617): dkimpy validates the chain (every ARC-Seal, the latest
  ARC-Message-Signature).

The verdict becomes our own ``Authentication-Results`` value (authres) with our authserv-id,
``SMTP_HOSTNAME``. Fields that arrived with the message and claim that same authserv-id are
forgeries (or our own, replayed) and are removed from what we present (RFC 8601 section 5).

DNS goes through ``DNS_RESOLVERS`` (dnspython) with ``AUTH_DNS_TIMEOUT`` per look-up, and
answers are kept per process for ``AUTH_DNS_CACHE_TTL`` seconds at most (never past their
own TTL), so a burst of mail from one sender costs its look-ups once; the verdict of one
delivery is kept as long, so a message for many mailboxes is verified once. A DNS failure
is a ``temperror`` (RFC 8601 section 2.7), never a ``fail``.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import authres
import dkim
import dkim.util
import dns.exception
import dns.rdatatype
import dns.resolver
import spf
from authheaders.dmarc_lookup import DMARCException, answer_to_dict
from authres.arc import ARCAuthenticationResult
from authres.dmarc import DMARCAuthenticationResult
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from prometheus_client import Counter, Histogram

from mailplatform import hostnames
from tenants.dns import resolver_new

logger = logging.getLogger(__name__)
# dkimpy logs every bad key or signature it meets at ERROR: hostile input, not our failure.
_LIBRARY_LOG = logging.getLogger(f"{__name__}.dkimpy")
_LIBRARY_LOG.addHandler(logging.NullHandler())
_LIBRARY_LOG.propagate = False

MAX_SIGNATURES = 10  # DKIM signatures verified per message (each costs a look-up)
SPF_TIME_LIMIT = 10.0  # seconds for one whole SPF evaluation (RFC 7208 section 4.6.4 says 20 at most)
_NEGATIVE_TTL_CAP = 30.0
_FAILURE_TTL = 5.0  # seconds a DNS failure is remembered per name
# One message's verification as a whole: DNS look-ups stop (temperror) past this many seconds,
# well inside the parse task's time limit, whatever the signatures and records ask for.
VERIFY_TIME_BUDGET = 20.0
_BUDGET = threading.local()
_CACHE_SIZE = 20_000
_VERDICT_CACHE_SIZE = 2_000
_COMMENT_OR_QUOTED = re.compile(r'("(?:[^"\\]|\\.)*")|\((?:[^()]|\([^()]*\))*\)')
_RECEIVER_KEY = re.compile(r'(?:^|[;\s])receiver\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;]+))', re.IGNORECASE)
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_ARC_SEAL = re.compile(rb"(?im)^arc-seal[ \t]*:")
_DKIM_SIGNATURE = re.compile(rb"(?im)^dkim-signature[ \t]*:")
SOURCES_WITH_SENDER_IP = frozenset({"smtp"})
# The result words each mechanism can have (RFC 8601 section 2.7, RFC 8617 section 4.4);
# DKIM's "none" is the summary of a message without a signature.
RESULTS: dict[str, tuple[str, ...]] = {
    "spf": ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"),
    "dkim": ("pass", "fail", "policy", "neutral", "none", "temperror", "permerror"),
    "dmarc": ("pass", "fail", "none", "temperror", "permerror"),
    "arc": ("pass", "fail", "none"),
}

VERDICTS = Counter(
    "mailboxes_authentication_verdicts_total", "Trust verdicts, by mechanism and result", ["mechanism", "result"]
)
RECHECKED = Counter(
    "mailboxes_authentication_rechecked_total",
    "Verdicts with a temperror verified again, by mechanism and new result",
    ["mechanism", "result"],
)
VERIFY_SECONDS = Histogram(
    "mailboxes_authentication_seconds",
    "Time to verify SPF, DKIM, DMARC and ARC of one message",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)


class DnsTemporaryFailure(Exception):
    """The DNS did not answer (timeout, SERVFAIL, no reachable server): nothing can be concluded."""


# --- DNS: one resolver configuration, a small per-process cache ---------------------------
class DnsCache:
    """TXT/A/AAAA/MX/PTR answers keyed by (resolvers, name, type), each until its expiry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: dict[tuple[object, str, str], tuple[float, list[Any] | DnsTemporaryFailure]] = {}

    def clear(self) -> None:
        with self._lock:
            self._answers.clear()

    def lookup(self, name: str, rdtype: str) -> list[Any]:
        """The records of ``name``: TXT as bytes (strings joined), A/AAAA as text, MX as
        (preference, host), PTR as host; [] for NXDOMAIN and no data."""
        name = name.rstrip(".").lower()
        key = (tuple(settings.DNS_RESOLVERS), name, rdtype)
        now = time.monotonic()
        with self._lock:
            cached = self._answers.get(key)
        if cached is not None and cached[0] > now:
            if isinstance(cached[1], DnsTemporaryFailure):
                raise cached[1]
            return cached[1]
        deadline = getattr(_BUDGET, "deadline", None)
        remaining = float(settings.AUTH_DNS_TIMEOUT) if deadline is None else deadline - now
        if remaining <= 0:
            raise DnsTemporaryFailure(f"{rdtype} {name}: the verification's time budget is spent")
        try:
            records, ttl = _resolve(name, rdtype, min(float(settings.AUTH_DNS_TIMEOUT), remaining))
        except DnsTemporaryFailure as failure:
            # Remembered briefly, so an outage costs each name one timeout, not one per message.
            with self._lock:
                self._answers[key] = (now + _FAILURE_TTL, failure)
            raise
        ttl = min(float(settings.AUTH_DNS_CACHE_TTL), ttl)
        if ttl > 0:
            with self._lock:
                if len(self._answers) >= _CACHE_SIZE:
                    self._answers.clear()
                self._answers[key] = (now + ttl, records)
        return records


def _resolve(name: str, rdtype: str, timeout: float) -> tuple[list[Any], float]:
    resolver = resolver_new(timeout=max(0.1, timeout))
    try:
        answer = resolver.resolve(name, rdtype, raise_on_no_answer=False, search=False)
    except dns.resolver.NXDOMAIN:
        return [], _NEGATIVE_TTL_CAP
    except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as exc:
        raise DnsTemporaryFailure(f"{rdtype} {name}: {type(exc).__name__}") from exc
    except dns.exception.DNSException as exc:
        raise DnsTemporaryFailure(f"{rdtype} {name}: {type(exc).__name__}") from exc
    if answer.rrset is None:
        return [], _NEGATIVE_TTL_CAP
    records: list[Any] = []
    for record in answer.rrset:
        if rdtype == "TXT":
            records.append(b"".join(record.strings))  # type: ignore[attr-defined]
        elif rdtype in {"A", "AAAA"}:
            records.append(record.address)  # type: ignore[attr-defined]
        elif rdtype == "MX":
            records.append((record.preference, record.exchange.to_text(True)))  # type: ignore[attr-defined]
        elif rdtype == "PTR":
            records.append(record.target.to_text(True))  # type: ignore[attr-defined]
    return records, float(answer.rrset.ttl)


DNS = DnsCache()


@contextlib.contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """Look-ups in this thread fail as temporary past ``seconds`` from now (nested: the earlier end)."""
    previous = getattr(_BUDGET, "deadline", None)
    deadline = time.monotonic() + seconds
    _BUDGET.deadline = deadline if previous is None else min(previous, deadline)
    try:
        yield
    finally:
        _BUDGET.deadline = previous


def dns_cache_clear() -> None:
    """Forget every cached answer and verdict (tests change their zone between cases)."""
    DNS.clear()
    _VERDICTS.clear()


def _dkim_txt(name: bytes | str, timeout: float = 5) -> bytes | None:
    """dkimpy's ``dnsfunc``: the first TXT record of ``name`` (a key record), None when absent."""
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    try:
        records = DNS.lookup(text, "TXT")
    except DnsTemporaryFailure as exc:
        raise dkim.DnsTimeoutError(str(exc)) from exc
    return records[0] if records else None


def _spf_lookup(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> list[Any]:
    """pyspf's DNS hook (``spf.DNSLookup``): [((name, type), value), ...] through our cache."""
    rdtype = "TXT" if qtype == "SPF" else qtype
    if rdtype not in {"TXT", "A", "AAAA", "MX", "PTR"}:
        return []
    try:
        records = DNS.lookup(name, rdtype)
    except DnsTemporaryFailure as exc:
        raise spf.TempError(f"DNS {exc}") from exc
    if rdtype == "TXT":
        # pyspf joins the strings of each record itself; ours are joined already.
        return [((name, qtype), (record,)) for record in records]
    return [((name, rdtype), record) for record in records]


# pyspf's documented extension point: every SPF look-up goes through our resolvers and cache.
spf.DNSLookup = _spf_lookup


# --- The verdict ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Envelope:
    """What the SMTP client said (RFC 5321), as the spool envelope recorded it."""

    source: str
    remote_ip: str | None
    helo: str
    mail_from: str

    @property
    def sender_ip_known(self) -> bool:
        """Whether ``remote_ip`` is the connecting IP of the sender's side (SMTP, not LMTP/API/IMAP)."""
        return self.source in SOURCES_WITH_SENDER_IP and bool(self.remote_ip)


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().strip(".").lower() if "@" in address else ""


def _ascii(value: bytes | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return re.sub(r"\s+", "", value)[:255]


def _reason(value: object) -> str:
    text = re.sub(r"[^\x20-\x7e]", "?", str(value))
    return text[:300]


def spf_verify(envelope: Envelope) -> dict[str, Any] | None:
    """The SPF verdict of the MAIL FROM identity (HELO for the null sender, RFC 7208 section 2.4).

    None without a connecting IP of the original sender: there is nothing to evaluate.
    """
    if not envelope.sender_ip_known:
        return None
    ip = str(envelope.remote_ip)
    try:
        address = ipaddress.ip_address(ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            ip = str(address.ipv4_mapped)
    except ValueError:
        return {"result": "permerror", "domain": "", "scope": "mailfrom", "ip": ip, "reason": "bad client address"}
    helo = envelope.helo.strip().strip("[]")
    mail_from = envelope.mail_from.strip()
    scope = "mailfrom" if mail_from else "helo"
    domain = _domain_of(mail_from) if mail_from else helo.lower()
    try:
        query = spf.query(i=ip, s=mail_from, h=helo, timeout=float(settings.AUTH_DNS_TIMEOUT), querytime=SPF_TIME_LIMIT)
        result, _code, explanation = query.check()
    except Exception as exc:  # pyspf raises on syntax it cannot even start with
        result, explanation = "permerror", f"{type(exc).__name__}: {exc}"
    result = str(result or "none").lower()
    if result not in {"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"}:
        result = "permerror"
    return {"result": result, "domain": domain, "scope": scope, "ip": ip, "reason": _reason(explanation)}


def dkim_verify(raw: bytes) -> list[dict[str, Any]]:
    """One verdict per DKIM-Signature (the first MAX_SIGNATURES), top to bottom."""
    if not _DKIM_SIGNATURE.search(header_block(raw)):  # unsigned: no second parse of the whole message
        return []
    try:
        verifier = dkim.DKIM(raw, logger=_LIBRARY_LOG, minkey=1024, timeout=settings.AUTH_DNS_TIMEOUT)
    except dkim.DKIMException as exc:
        return [
            {
                "result": "permerror",
                "domain": "",
                "selector": "",
                "algorithm": "",
                "aligned": False,
                "reason": _reason(exc),
            }
        ]
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    return [_dkim_one(verifier, index) for index in range(min(count, MAX_SIGNATURES))]


def _dkim_one(verifier: dkim.DKIM, index: int) -> dict[str, Any]:
    verdict: dict[str, Any] = {
        "result": "permerror",
        "domain": "",
        "selector": "",
        "algorithm": "",
        "aligned": False,
        "reason": "",
    }
    try:
        prepared = verifier.verify_headerprep(index)
    except dkim.DKIMException as exc:
        verdict["reason"] = _reason(exc)
        return verdict
    if not prepared:
        verdict["reason"] = "signature not found"
        return verdict
    fields = prepared[0]
    verdict.update(
        domain=_ascii(fields.get(b"d")).lower(),
        selector=_ascii(fields.get(b"s")),
        algorithm=_ascii(fields.get(b"a")).lower(),
    )
    name = f"{verdict['selector']}._domainkey.{verdict['domain']}"
    try:
        key = DNS.lookup(name, "TXT")
    except DnsTemporaryFailure as exc:
        verdict.update(result="temperror", reason=_reason(exc))
        return verdict
    if not key:
        verdict["reason"] = f"no key for signature at {name}"
        return verdict
    problem = _key_problem(key[0])
    if problem:
        verdict["reason"] = problem
        return verdict
    try:
        good = verifier.verify(idx=index, dnsfunc=_dkim_txt)
    except dkim.ValidationError as exc:  # body hash mismatch, expired, bad tags
        verdict.update(result="fail", reason=_reason(exc))
        return verdict
    except dkim.DKIMException as exc:  # key too small, unknown key type
        verdict["reason"] = _reason(exc)
        return verdict
    except Exception as exc:  # the library tripping over hostile input
        verdict["reason"] = _reason(f"{type(exc).__name__}: {exc}")
        return verdict
    if not good:
        verdict.update(result="fail", reason="signature did not verify")
    elif verdict["algorithm"] == "rsa-sha1":
        verdict.update(result="policy", reason="rsa-sha1 signatures are not accepted (RFC 8301)")
    else:
        verdict.update(result="pass", reason="")
    return verdict


@functools.lru_cache(maxsize=1024)
def _key_problem(record: bytes) -> str:
    """Why a key record is unusable (RFC 6376 section 3.6.1), or "" for a good one."""
    try:
        dkim.evaluate_pk("key", record)
    except dkim.DKIMException as exc:
        return _reason(f"bad key: {exc}")
    except Exception as exc:  # the library tripping over a hostile record
        return _reason(f"bad key: {type(exc).__name__}")
    return ""


def arc_verify(raw: bytes) -> dict[str, Any]:
    """The ARC chain validation status (RFC 8617 section 5.2) and who sealed each instance."""
    if not _ARC_SEAL.search(header_block(raw)):  # most mail: no chain, so no second parse of it
        return {"result": "none", "instances": 0, "sealers": [], "reason": ""}
    try:
        verifier = dkim.ARC(raw, logger=_LIBRARY_LOG, minkey=1024, timeout=settings.AUTH_DNS_TIMEOUT)
        instances, headers = verifier.sorted_arc_headers()
    except dkim.DKIMException as exc:
        return {"result": "fail", "instances": 0, "sealers": [], "reason": _reason(exc)}
    if not instances:
        return {"result": "none", "instances": 0, "sealers": [], "reason": ""}
    sealers: dict[int, str] = {}
    for instance, (name, value) in headers:
        if name.lower() == b"arc-seal":
            try:
                sealers[instance] = _ascii(dkim.util.parse_tag_value(value).get(b"d")).lower()
            except Exception:
                sealers[instance] = ""
    try:
        status, _results, comment = verifier.verify(dnsfunc=_dkim_txt)
    except Exception as exc:
        status, comment = dkim.CV_Fail, f"{type(exc).__name__}: {exc}"
    result = (status or dkim.CV_Fail).decode("ascii")
    return {
        "result": result if result in {"pass", "fail", "none"} else "fail",
        "instances": int(instances),
        "sealers": [sealers.get(number, "") for number in range(1, int(instances) + 1)],
        "reason": "" if comment == "success" else _reason(comment),
    }


# --- DMARC -------------------------------------------------------------------------------
_PSL: Any = None
_PSL_LOCK = threading.Lock()


def organizational_domain(domain: str) -> str:
    """RFC 7489 section 3.2: the public suffix plus one label (authheaders' suffix list)."""
    global _PSL
    if _PSL is None:
        with _PSL_LOCK:
            if _PSL is None:
                import importlib.resources

                from publicsuffix2 import PublicSuffixList

                source = importlib.resources.files("authheaders") / "public_suffix_list.txt"
                with source.open(encoding="utf-8") as handle:
                    _PSL = PublicSuffixList(handle)
    domain = domain.lower().strip(".")
    found = str(_PSL.get_sld(domain) or domain)
    labels = domain.split(".")
    if "." not in found and len(labels) >= 2:
        # A TLD the list does not know: the default rule "*" makes the TLD the public suffix
        # (the list's own algorithm), so the organization is the last two labels.
        return ".".join(labels[-2:])
    return found


def _aligned(domain: str, from_domain: str, mode: str) -> bool:
    domain = domain.lower().rstrip(".")
    if not domain:
        return False
    if mode == "s":
        return domain == from_domain
    return organizational_domain(domain) == organizational_domain(from_domain)


def header_block(raw: bytes) -> bytes:
    """The header section of a message (RFC 5322 section 2.1), up to the first empty line."""
    header_end = _HEADER_END.search(raw)
    return raw[: header_end.start()] if header_end else raw


def from_domains(raw: bytes) -> list[str]:
    """The domains of the RFC5322.From addresses (RFC 7489 section 6.6.1), in order."""
    head = header_block(raw)
    values = [
        re.sub(r"\r?\n[ \t]", " ", match.group(1).decode("utf-8", "replace"))
        for match in re.finditer(rb"(?im)^from[ \t]*:((?:.*)(?:\r?\n[ \t].*)*)", head)
    ]
    domains = []
    for _name, address in email.utils.getaddresses(values):
        domain = _domain_of(address)
        if domain:
            domains.append(domain.encode("idna").decode("ascii") if not domain.isascii() else domain)
    return domains


def _dmarc_record(domain: str) -> dict[str, str] | None:
    """The one DMARC record at ``_dmarc.<domain>`` (section 6.6.3: none, or several, is none)."""
    records = [text for text in (record.decode("utf-8", "replace") for record in DNS.lookup(f"_dmarc.{domain}", "TXT"))]
    dmarc = [text for text in records if re.match(r"^v\s*=\s*DMARC1\s*(;|$)", text)]
    if len(dmarc) != 1:
        return None
    try:
        return answer_to_dict(dmarc[0])
    except DMARCException:
        return None


def dmarc_verify(
    raw: bytes, spf_verdict: dict[str, Any] | None, dkim_verdicts: list[dict[str, Any]], envelope: Envelope
) -> dict[str, Any]:
    """The DMARC verdict of the From domain (RFC 7489 section 6.6), with policy and alignment."""
    verdict: dict[str, Any] = {
        "result": "none",
        "domain": "",
        "policy": "",
        "record_domain": "",
        "pct": 100,
        "alignment": {"spf": False, "dkim": False, "spf_mode": "r", "dkim_mode": "r"},
        "reason": "",
    }
    domains = list(dict.fromkeys(from_domains(raw)))
    if not domains:
        verdict.update(result="permerror", reason="no From domain (RFC 7489 section 6.6.1)")
        return verdict
    if len(domains) > 1:
        verdict.update(result="permerror", domain=",".join(domains)[:253], reason="several From domains")
        return verdict
    from_domain = verdict["domain"] = domains[0]
    organization = organizational_domain(from_domain)
    try:
        record = _dmarc_record(from_domain)
        record_domain = from_domain
        if record is None and organization != from_domain:
            record, record_domain = _dmarc_record(organization), organization
    except DnsTemporaryFailure as exc:
        verdict.update(result="temperror", reason=_reason(exc))
        return verdict
    if record is None:
        verdict["reason"] = "no DMARC record"
        return verdict
    policy = record.get("p", "").rstrip("\\")
    if record_domain != from_domain:  # section 6.6.3: a subdomain takes sp= where there is one
        policy = record.get("sp", policy).rstrip("\\")
    if policy not in {"none", "quarantine", "reject"}:
        policy = "none"  # section 6.6.3 step 6: an invalid p= with a rua= is treated as none
    try:
        pct = max(0, min(100, int(record.get("pct", "100"))))
    except ValueError:
        pct = 100
    spf_mode = "s" if record.get("aspf") == "s" else "r"
    dkim_mode = "s" if record.get("adkim") == "s" else "r"
    spf_domain = str(spf_verdict.get("domain") or "") if spf_verdict else ""
    spf_aligned = bool(spf_verdict and spf_verdict["result"] == "pass" and _aligned(spf_domain, from_domain, spf_mode))
    for signature in dkim_verdicts:
        signature["aligned"] = signature["result"] == "pass" and _aligned(signature["domain"], from_domain, dkim_mode)
    dkim_aligned = any(signature["aligned"] for signature in dkim_verdicts)
    verdict.update(
        policy=policy,
        record_domain=record_domain,
        pct=pct,
        alignment={"spf": spf_aligned, "dkim": dkim_aligned, "spf_mode": spf_mode, "dkim_mode": dkim_mode},
    )
    if spf_aligned or dkim_aligned:
        verdict["result"] = "pass"
        return verdict
    unknown = [
        name
        for name, result in [
            ("spf", (spf_verdict or {}).get("result")),
            *[("dkim", s["result"]) for s in dkim_verdicts],
        ]
        if result == "temperror"
    ]
    if unknown:
        # A DNS failure might have hidden an aligned pass: no conclusion (RFC 7489 section 6.6.2).
        verdict.update(result="temperror", reason=f"{' and '.join(dict.fromkeys(unknown))} could not be checked")
        return verdict
    verdict["result"] = "fail"
    reasons = ["no aligned DKIM signature"]
    if spf_verdict is None:
        reasons.append(f"SPF not evaluated ({_NO_SENDER_IP.get(envelope.source, 'no connecting IP')})")
    elif spf_verdict["result"] == "pass":
        reasons.append(f"SPF domain {spf_domain} not aligned")
    else:
        reasons.append(f"SPF {spf_verdict['result']}")
    verdict["reason"] = "; ".join(reasons)
    return verdict


_NO_SENDER_IP = {
    "lmtp": "received over LMTP: no connecting IP of the original sender",
    "api": "uploaded through the API: no connecting IP of the original sender",
    "imap": "pulled over IMAP: no connecting IP of the original sender",
    "smtp": "no connecting IP recorded",
}


# --- Our Authentication-Results ------------------------------------------------------------
def _token(value: str) -> str | None:
    """A property value safe in the header (RFC 8601 section 2.2 pvalue): hostile signatures
    may carry anything in d= or s=, and a ``;`` would end the result early."""
    return re.sub(r"[^A-Za-z0-9._@+-]", "", value)[:255] or None


def authentication_results_value(verdict: dict[str, Any]) -> str:
    """Our Authentication-Results header value (RFC 8601 section 2.2), built with authres."""
    results: list[Any] = []
    spf_verdict = verdict.get("spf")
    if spf_verdict:
        identity = _token(spf_verdict["domain"])
        results.append(
            authres.SPFAuthenticationResult(
                result=spf_verdict["result"],
                smtp_helo=identity if spf_verdict["scope"] == "helo" else None,
                smtp_mailfrom=identity if spf_verdict["scope"] == "mailfrom" else None,
            )
        )
    for signature in verdict.get("dkim") or []:
        results.append(
            authres.DKIMAuthenticationResult(
                result=signature["result"],
                # authres leaves a value with "@" unquoted: keep it from ending the result early.
                reason=signature["reason"].replace("@", " at ")[:200] or None,
                header_d=_token(signature["domain"]),
                header_s=_token(signature["selector"]),
                header_a=_token(signature["algorithm"]),
            )
        )
    if not verdict.get("dkim"):
        results.append(authres.DKIMAuthenticationResult(result="none"))
    dmarc_verdict = verdict.get("dmarc") or {}
    if dmarc_verdict:
        results.append(
            DMARCAuthenticationResult(
                result=dmarc_verdict["result"],
                header_from=_token(dmarc_verdict["domain"]),
                policy=dmarc_verdict["policy"] or None,
            )
        )
    arc_verdict = verdict.get("arc") or {}
    if arc_verdict:
        results.append(ARCAuthenticationResult(result=arc_verdict["result"]))
    comment = None if verdict.get("sender_ip_known") else _NO_SENDER_IP.get(str(verdict.get("source")))
    header = authres.AuthenticationResultsHeader(
        authserv_id=verdict["authserv_id"], authserv_id_comment=comment, results=results
    )
    return str(header.header_value())


def authserv_id() -> str:
    return hostnames.authserv_id()


def _comment_split(text: str) -> tuple[str, str]:
    """The comment ``text`` opens with (which may nest, RFC 5322 section 3.2.2), and the rest."""
    depth, end = 0, len(text)
    for position, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            end = position + 1
            break
    return text[:end], text[end:].lstrip()


def authserv_id_of(value: str) -> str:
    """The authserv-id an Authentication-Results value claims (RFC 8601 section 2.2): its first token."""
    text = value.strip()
    while text.startswith("("):  # leading comments
        text = _comment_split(text)[1]
    match = re.match(r'"([^"]*)"|([^\s;()]+)', text)
    if not match:
        return ""
    return (match.group(1) if match.group(1) is not None else match.group(2)).lower().rstrip(".")


def received_spf_receivers(value: str) -> set[str]:
    """The SPF verifier a Received-SPF value names (RFC 7208 section 9.1): its ``receiver=``
    key, and the host that opens its comment (``pass (mx.example: domain of ...)``)."""
    text = value.strip()
    text = text[len(re.match(r"[^\s(]*", text).group(0)) :].lstrip()  # type: ignore[union-attr]
    named: set[str] = set()
    if text.startswith("("):
        comment, text = _comment_split(text)
        opening = re.match(r"\(\s*([^\s:()]+)\s*:", comment)
        if opening:
            named.add(opening.group(1).lower().rstrip("."))
    # Other comments are not keys: dropped (quoted strings kept whole) before reading receiver=.
    keys = _COMMENT_OR_QUOTED.sub(lambda match: match.group(1) or " ", text)
    for match in _RECEIVER_KEY.finditer(keys):
        named.add((match.group(1) if match.group(1) is not None else match.group(2)).lower().rstrip("."))
    return named


def _claims_us(name: str, value: str, ours: str) -> bool:
    """An arrived field that claims to be our own verdict: forged, or ours replayed."""
    if name == "authentication-results":
        return authserv_id_of(value) == ours
    if name == "received-spf":
        return ours in received_spf_receivers(value)
    return False


def headers_presented(headers: Iterable[list[str]], own: str | None) -> list[list[str]]:
    """The header fields as we show them: ours first (when verified), and without the
    Authentication-Results that arrived claiming our authserv-id (RFC 8601 section 5) or the
    Received-SPF naming our host as the verifier (RFC 7208 section 9.1: only we may write those)."""
    ours = authserv_id()
    kept = [pair for pair in headers if not _claims_us(pair[0].lower(), pair[1], ours)]
    return [["Authentication-Results", own], *kept] if own else kept


def received_spf_presented(headers: Iterable[list[str]]) -> str:
    """The Received-SPF values left in the header list as presented, as the message shows them."""
    return "\n".join(value for name, value in headers if name.lower() == "received-spf")[:8000]


# --- The copy a mail client gets (IMAP, POP3) ------------------------------------------------
# The raw object stays as received (the API's raw download serves it so). What IMAP and POP3
# present is a copy: our Authentication-Results field first, and without the fields that
# :func:`headers_presented` leaves out of the API's header list. Where to cut and what to put
# first is worked out once, when the message is verified, and kept in the verdict
# (``presented``), so a client's RFC822.SIZE, LIST or STAT needs no read of the message and
# always matches the bytes it then receives.
_FIELD_LINE = re.compile(rb"[^\n]*(?:\n|$)")


def forged_ranges(raw: bytes, ours: str | None = None) -> list[list[int]]:
    """``[start, end)`` byte ranges of the header fields (with their folded lines and line
    breaks) that claim to be our verdict: Authentication-Results with our authserv-id,
    compared case-insensitively (RFC 8601 section 5), and Received-SPF naming us."""
    ours = authserv_id() if ours is None else ours
    head = header_block(raw)
    ranges: list[list[int]] = []
    start = -1
    name = b""
    value = bytearray()

    def close(end: int) -> None:
        if start >= 0 and name:
            text = re.sub(r"\r?\n", "", value.decode("utf-8", "replace"))
            if _claims_us(name.decode("latin-1").strip().lower(), text, ours):
                ranges.append([start, end])

    position = 0
    while position < len(head):
        line = _FIELD_LINE.match(head, position).group(0)  # type: ignore[union-attr]
        if not line:
            break
        if line[:1] in (b" ", b"\t") and start >= 0:
            value += line
        else:
            close(position)
            start = position
            name, _colon, rest = line.partition(b":")
            value = bytearray(rest if _colon else b"")
            if not _colon:
                name = b""  # not a field (an mbox "From " line, garbage): never cut
        position += len(line)
    # The last field's line break is the first half of the empty line that ends the header.
    last_end = position
    if last_end < len(raw) and raw[last_end : last_end + 1] in (b"\r", b"\n"):
        last_end += 2 if raw[last_end : last_end + 2] == b"\r\n" else 1
    close(last_end)
    return ranges


def own_field(value: str, raw: bytes) -> str:
    """Our Authentication-Results field as it goes on top of the copy: folded before the
    space after each ``;`` (unfolding gives back ``value`` exactly, RFC 5322 section 2.2.3),
    with the message's own line break."""
    newline = "\r\n" if re.match(rb"[^\n]*\r\n", raw) or b"\n" not in raw else "\n"
    return "Authentication-Results: " + value.replace("; ", ";" + newline + " ") + newline


def presentation_of(raw: bytes, header: str) -> dict[str, Any]:
    """What the copy a client gets changes: ``field`` (ours, put first), ``removed`` (ranges
    of the raw message left out) and ``delta`` (presented size minus raw size)."""
    removed = forged_ranges(raw)
    field = own_field(header, raw)
    return {
        "field": field,
        "removed": removed,
        "delta": len(field.encode()) - sum(end - start for start, end in removed),
    }


def presentation_unverified(raw: bytes) -> dict[str, Any]:
    """The copy of a message without our verdict (AUTH_VERIFY off, or shown before its parse
    finished): only the fields claiming our authserv-id left out, nothing put first."""
    removed = forged_ranges(raw)
    return {"field": "", "removed": removed, "delta": -sum(end - start for start, end in removed)}


def presented_chunks(chunks: Iterable[bytes], presented: dict[str, Any] | None) -> Iterator[bytes]:
    """The copy a client gets, from the raw message's chunks: unchanged without ``presented``
    (a message stored before verdicts, and with AUTH_VERIFY off before imap_presentation)."""
    if not presented:
        yield from chunks
        return
    yield str(presented["field"]).encode()
    cuts = sorted((int(start), int(end)) for start, end in presented.get("removed") or [])
    offset = 0
    for chunk in chunks:
        begin, finish = offset, offset + len(chunk)
        offset = finish
        position = begin
        for start, end in cuts:
            if end <= position or start >= finish:
                continue
            if start > position:
                yield chunk[position - begin : start - begin]
            position = max(position, min(end, finish))
        if position < finish:
            yield chunk[position - begin :]


def presented_bytes(raw: bytes, presented: dict[str, Any] | None) -> bytes:
    """The whole copy a client gets (see :func:`presented_chunks`)."""
    if not presented:
        return raw
    return b"".join(presented_chunks([raw], presented))


# --- The whole verdict ---------------------------------------------------------------------
class _VerdictCache:
    """Verdicts of recent deliveries: one delivery to many mailboxes is verified once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._verdicts: dict[tuple[object, ...], tuple[float, dict[str, Any]]] = {}

    def clear(self) -> None:
        with self._lock:
            self._verdicts.clear()

    def get(self, key: tuple[object, ...]) -> dict[str, Any] | None:
        with self._lock:
            cached = self._verdicts.get(key)
        if cached is None or cached[0] <= time.monotonic():
            return None
        return cached[1]

    def put(self, key: tuple[object, ...], verdict: dict[str, Any]) -> None:
        ttl = float(settings.AUTH_DNS_CACHE_TTL)
        if ttl <= 0 or verdict_has_temperror(verdict):
            return
        with self._lock:
            if len(self._verdicts) >= _VERDICT_CACHE_SIZE:
                self._verdicts.clear()
            self._verdicts[key] = (time.monotonic() + ttl, verdict)


_VERDICTS = _VerdictCache()


def verdict_has_temperror(verdict: dict[str, Any]) -> bool:
    return "temperror" in verdict_summary(verdict).values() or any(
        signature["result"] == "temperror" for signature in verdict.get("dkim") or []
    )


def message_verify(raw: bytes, envelope: Envelope, *, arc: bool = True) -> dict[str, Any]:
    """SPF, every DKIM signature, DMARC and (with ``arc``) ARC of one message: the verdict as JSON."""
    with time_budget(VERIFY_TIME_BUDGET):
        spf_verdict = spf_verify(envelope)
        dkim_verdicts = dkim_verify(raw)
        dmarc_verdict = dmarc_verify(raw, spf_verdict, dkim_verdicts, envelope)
        arc_verdict = arc_verify(raw) if arc else None
    verdict: dict[str, Any] = {
        "authserv_id": authserv_id(),
        "verified_at": timezone.now().isoformat(),
        "source": envelope.source,
        "sender_ip_known": envelope.sender_ip_known,
        "spf": spf_verdict,
        "dkim": dkim_verdicts,
        "dmarc": dmarc_verdict,
        "arc": arc_verdict,
    }
    verdict["header"] = authentication_results_value(verdict)
    verdict["presented"] = presentation_of(raw, verdict["header"])
    return verdict


def verdict_summary(verdict: dict[str, Any] | None) -> dict[str, str | None]:
    """One word per mechanism: what search, the columns and ``indexer.indexed`` carry.

    ``dkim`` is ``pass`` when any signature passes, else the first signature's result, and
    ``none`` without one; ``spf`` is None without a connecting IP of the original sender.
    """
    if not verdict:
        return {"spf": None, "dkim": None, "dmarc": None, "arc": None}
    signatures = verdict.get("dkim") or []
    dkim_result = "none"
    if any(signature["result"] == "pass" for signature in signatures):
        dkim_result = "pass"
    elif signatures:
        dkim_result = str(signatures[0]["result"])
    return {
        "spf": (verdict.get("spf") or {}).get("result"),
        "dkim": dkim_result,
        "dmarc": (verdict.get("dmarc") or {}).get("result"),
        "arc": (verdict.get("arc") or {}).get("result"),
    }


def message_authentication_fields(
    *, raw: bytes, sha256: str, envelope: Envelope, headers: list[list[str]]
) -> dict[str, Any]:
    """The Message fields the parse step writes: the verdict, its one-word columns, our
    Authentication-Results, and the header list as presented (see :func:`headers_presented`).

    With AUTH_VERIFY off nothing is verified (``authentication`` stays null), but forged
    fields claiming our authserv-id are still not presented, nor served over IMAP and POP3
    (``imap_presentation``).
    """
    if not settings.AUTH_VERIFY:
        kept = headers_presented(headers, None)
        sender_claims = [value for name, value in kept if name.lower() == "authentication-results"]
        return {
            "headers": kept,
            "authentication_results": "\n".join(sender_claims)[:8000],
            "received_spf": received_spf_presented(kept),
            "imap_presentation": presentation_unverified(raw),
        }
    key = (sha256, envelope, authserv_id(), tuple(settings.DNS_RESOLVERS))
    verdict = _VERDICTS.get(key)
    if verdict is None:
        started = time.perf_counter()
        verdict = message_verify(raw, envelope)
        VERIFY_SECONDS.observe(time.perf_counter() - started)
        _VERDICTS.put(key, verdict)
    summary = verdict_summary(verdict)
    presented = headers_presented(headers, verdict["header"])
    for mechanism, result in summary.items():
        VERDICTS.labels(mechanism, result or "not_checked").inc()
    return {
        "authentication": verdict,
        "authentication_results": verdict["header"],
        "auth_spf": summary["spf"] or "",
        "auth_dkim": summary["dkim"] or "",
        "auth_dmarc": summary["dmarc"] or "",
        "auth_arc": summary["arc"] or "",
        "auth_recheck_at": recheck_at(verdict, 0),
        "headers": presented,
        "received_spf": received_spf_presented(presented),
    }


# --- Verdicts with a temperror, verified again -----------------------------------------------
# A temperror says only that the DNS did not answer then (RFC 8601 section 2.7.1): the
# verdict is verified again after each of these delays, and after the last one stays as it is.
RECHECK_DELAYS = (60.0, 600.0, 3600.0)
RECHECK_BATCH = 200
RECHECK_SWEEP_SECONDS = 150.0  # one sweep stops starting re-checks past this (task soft limit 240 s)


def recheck_at(verdict: dict[str, Any], rechecks: int) -> datetime | None:
    """When a verdict verified ``rechecks`` times again is due once more (None: never)."""
    if rechecks >= len(RECHECK_DELAYS) or not verdict_has_temperror(verdict):
        return None
    return timezone.now() + timedelta(seconds=RECHECK_DELAYS[rechecks])


def message_reverify(*, message_id: UUID | str) -> dict[str, Any] | None:
    """Verify one message whose verdict has a temperror again; store the new verdict, its
    columns and our Authentication-Results (first among the headers shown). Returns the new
    verdict, or None when nothing was due (verified meanwhile, deleted, raw object gone)."""
    from mailboxes.models import Message
    from mailboxes.pipeline import RawMissing, raw_read

    fields = ("pk", "storage_key", "source", "remote_ip", "helo", "mail_from", "authentication", "auth_recheck_at")
    message = Message.objects.filter(pk=message_id, auth_recheck_at__isnull=False).only(*fields).order_by().first()
    if message is None:
        return None
    try:
        raw = raw_read(message)
    except RawMissing:
        Message.objects.filter(pk=message.pk).update(auth_recheck_at=None)
        return None
    rechecks = int((message.authentication or {}).get("rechecks") or 0) + 1
    verdict = message_verify(raw, Envelope(message.source, message.remote_ip, message.helo, message.mail_from))
    verdict["rechecks"] = rechecks
    # What IMAP and POP3 serve stays the copy they were first given: content never changes
    # under a UID (RFC 3501 section 2.3.1.1). The API and search get the new verdict.
    verdict.pop("presented", None)
    served = (message.authentication or {}).get("presented")
    if served:
        verdict["presented"] = served
    summary = verdict_summary(verdict)
    with transaction.atomic():
        claimed = (
            Message.objects.select_for_update()
            .filter(pk=message.pk, auth_recheck_at=message.auth_recheck_at, deleted_at__isnull=True)
            .only("pk", "headers")
            .order_by()
            .first()
        )
        if claimed is None:  # verified again meanwhile by another sweep, or deleted
            return None
        Message.objects.filter(pk=claimed.pk).update(
            authentication=verdict,
            authentication_results=verdict["header"],
            auth_spf=summary["spf"] or "",
            auth_dkim=summary["dkim"] or "",
            auth_dmarc=summary["dmarc"] or "",
            auth_arc=summary["arc"] or "",
            auth_recheck_at=recheck_at(verdict, rechecks),
            # Our earlier header claims our authserv-id too, so it goes with the forgeries.
            headers=headers_presented(claimed.headers, verdict["header"]),
        )
    for mechanism, result in summary.items():
        RECHECKED.labels(mechanism, result or "not_checked").inc()
    return verdict


def messages_reverify_due(*, limit: int = RECHECK_BATCH, seconds: float = RECHECK_SWEEP_SECONDS) -> int:
    """The sweeper: verify again the messages whose temperror verdict is due; returns how many."""
    from mailboxes.models import Message

    if not settings.AUTH_VERIFY:
        return 0
    due = list(
        Message.objects.filter(auth_recheck_at__lte=timezone.now(), deleted_at__isnull=True)
        .order_by("auth_recheck_at")
        .values_list("pk", flat=True)[:limit]
    )
    deadline = time.monotonic() + seconds
    done = 0
    for message_id in due:
        if time.monotonic() >= deadline:
            break  # a DNS still failing costs time-outs: the rest waits for the next sweep
        message_reverify(message_id=message_id)
        done += 1
    return done


# --- The DMARC refusal at DATA (a domain's dmarc_reject) --------------------------------------
@dataclass(frozen=True)
class Refusal:
    """What the DMARC check at DATA decided: accept (None reply), refuse, or defer."""

    reply: str | None
    verdict: dict[str, Any]


DMARC_REJECTED = "550 5.7.1 Message rejected: DMARC policy of the From domain (p=reject), see RFC 7489"
DMARC_UNKNOWN = "451 4.7.0 DMARC could not be checked (DNS failure), try again later"


def dmarc_refusal(raw: bytes, envelope: Envelope) -> Refusal:
    """Whether SMTP mail must be refused under its From domain's ``p=reject`` (RFC 7489 section 6.6.4).

    Refused (``550 5.7.1``) only on a definite ``fail`` under ``p=reject`` (the subdomain
    policy where it applies) with ``pct=100``, and only for mail whose connecting IP is the
    sender's (SPF could be evaluated); a DNS failure that could change the answer defers it
    (``451 4.7.0``); anything else is accepted, and gets its full verdict in the parse step.
    """
    if not envelope.sender_ip_known:
        return Refusal(None, {})
    with time_budget(VERIFY_TIME_BUDGET * 0.75):  # inside ingest.smtp.DMARC_CHECK_TIMEOUT
        spf_verdict = spf_verify(envelope)
        dkim_verdicts = dkim_verify(raw)
        dmarc_verdict = dmarc_verify(raw, spf_verdict, dkim_verdicts, envelope)
    verdict = {"spf": spf_verdict, "dkim": dkim_verdicts, "dmarc": dmarc_verdict}
    if dmarc_verdict["result"] == "temperror" and dmarc_verdict["policy"] in {"", "reject"}:
        return Refusal(DMARC_UNKNOWN, verdict)  # the policy, or a pass that would spare the mail, is unknown
    if dmarc_verdict["result"] == "fail" and dmarc_verdict["policy"] == "reject" and dmarc_verdict["pct"] == 100:
        return Refusal(DMARC_REJECTED, verdict)
    return Refusal(None, verdict)
