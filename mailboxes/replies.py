"""The new part of a reply, and subjects without their Re:/Fwd: prefixes.

Like Mailgun's ``stripped-text`` and Postmark's ``StrippedTextReply``: cut at the first
attribution line ("On ... wrote:", in several languages) or Outlook's original-message
block, drop ``>`` quoted lines (RFC 3676 section 4.5), and cut the signature at the
``-- `` separator (RFC 3676 section 4.3) or a mobile client's "Sent from my ..." line.
"""

from __future__ import annotations

import re

_ATTRIBUTION = re.compile(
    r"^\s*("
    r"On\b.{0,300}\bwrote:?|"  # English (Gmail, Apple Mail, Thunderbird)
    r"Le\b.{0,300}\ba écrit\s*:?|"  # French
    r"Am\b.{0,300}\bschrieb.{0,100}:?|"  # German
    r"El\b.{0,300}\bescribió:?|"  # Spanish
    r"Il\b.{0,300}\bha scritto:?|"  # Italian
    r"Em\b.{0,300}\bescreveu:?|"  # Portuguese
    r"Op\b.{0,300}\bschreef.{0,100}:?|"  # Dutch
    r"-{2,}\s*Original Message\s*-{2,}|"
    r"-{2,}\s*Forwarded message\s*-{2,}|"
    r"_{20,}|"  # Outlook's rule above the quoted header block
    r"From:\s.+\n\s*(Sent|Date):\s.+"  # Outlook's quoted header block
    r")\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_SIGNATURE = re.compile(r"^(-- |--|Sent from my .{1,40}|Get Outlook for .{1,40})\s*$", re.MULTILINE)
_PREFIX = re.compile(
    r"^\s*((re|fw|fwd|aw|wg|sv|vs|antw|rif|r|tr|enc|res|odp|ynt|回复|回覆|答复|转发)\s*(\[\d+\])?\s*[:\uff1a]\s*)+",
    re.IGNORECASE,
)


def reply_strip(text: str) -> str:
    """The text above the quoted history and signature."""
    if not text:
        return ""
    text = text.replace("\r\n", "\n")[:500_000]
    attribution = _ATTRIBUTION.search(text)
    if attribution and attribution.start() > 0:
        text = text[: attribution.start()]
    kept = [line for line in text.split("\n") if not line.lstrip().startswith(">")]
    text = "\n".join(kept)
    signature = _SIGNATURE.search(text)
    if signature and signature.start() > 0:
        text = text[: signature.start()]
    return text.strip()


def subject_normalize(subject: str) -> str:
    """``Re: Fwd: [2] Hello`` -> ``hello``: the subject a conversation shares."""
    return " ".join(_PREFIX.sub("", subject or "").split()).casefold()[:300]


def subject_is_reply(subject: str) -> bool:
    return bool(_PREFIX.match(subject or ""))
