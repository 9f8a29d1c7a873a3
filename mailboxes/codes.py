"""One-time codes and links, pulled out of a message so a test script never parses mail.

Codes: a 4 to 8 character token (digits, or letters with at least one digit, optionally
split once by a hyphen or space like ``123-456``, or digits behind a one-letter prefix like
Google's ``G-551234``) near a keyword such as "code", "OTP",
"PIN" or "verification" in one of a dozen languages. Candidates are ranked by distance to
the nearest keyword; tokens that look like years, prices, phone numbers or parts of URLs
are skipped. Links: http(s) URLs from the text and from the HTML anchors, with anchor text.
"""

from __future__ import annotations

import re

from mailboxes.sanitize import html_anchors

_KEYWORDS = re.compile(
    r"(?i)(code|otp|one[- ]time|passcode|password|pin\b|verif\w*|confirm\w*|token|security|2fa|mfa|"
    r"c[óo]digo|verificaci[óo]n|c[oó]d\.|contrase[ñn]a|v[ée]rification|mot de passe|bestätigung\w*|"
    r"sicherheitscode|kennwort|codice|verifica|kod\w*|weryfikac\w*|код\w*|парол\w*|пароль|"
    r"验证码|驗證碼|校验码|認証コード|確認コード|コード|인증\s*번호|인증코드|doğrulama|kodu|mã|xác minh)"
)
_CANDIDATE = re.compile(
    r"(?<![\w@/.#:$€£-])("
    r"\d{3}[- ]\d{3}|\d{4}[- ]\d{4}|"  # 123-456, 1234 5678
    r"(?=[A-Z0-9-]*[A-Z])[A-Z0-9]{3,4}-[A-Z0-9]{3,4}|"  # ABC-123
    r"[A-Za-z0-9]{4,8}"
    r")(?![\w@/-]|\.\w|,\d)"
)
# A one-letter sender prefix before the digits, as Google's "G-551234 is your verification
# code": the digits are what the form asks for.
_PREFIXED = re.compile(r"(?<![\w@/.#:$€£-])[A-Z]-(\d{4,8})(?![\w@/-]|\.\w|,\d)")
_URL = re.compile(r"https?://[^\s<>\"'\])}]+", re.IGNORECASE)
_WINDOW = 120  # characters between a keyword and its code
MAX_CODES = 5
MAX_CODE_TEXT = 200_000  # characters of the body searched for codes
MAX_LINKS = 200


def _plausible(token: str) -> bool:
    compact = token.replace("-", "").replace(" ", "")
    if not 4 <= len(compact) <= 8 or not compact.isalnum() or not compact.isascii():
        return False
    if not any(ch.isdigit() for ch in compact):
        return False  # a word, not a code
    if compact.isdigit():
        return not (len(compact) == 4 and 1900 <= int(compact) <= 2100)  # not a year
    letters = [ch for ch in compact if ch.isalpha()]
    # Mixed codes are usually upper case (ABC123); lower-case mixes are mostly identifiers.
    return all(ch.isupper() for ch in letters) or len(letters) <= 2


def _without_urls(text: str) -> str:
    return _URL.sub(lambda match: " " * len(match.group(0)), text)


def codes_extract(subject: str, text: str) -> list[str]:
    """Verification codes, best first (at most ``MAX_CODES``)."""
    ranked: dict[str, tuple[int, int]] = {}
    # Bounded before the URL pass, not after it: a long body costs no more than its start.
    for source_rank, source in enumerate((subject or "", _without_urls((text or "")[:MAX_CODE_TEXT]))):
        keywords = [match.start() for match in _KEYWORDS.finditer(source)]
        if not keywords:
            continue
        for match in (*_CANDIDATE.finditer(source), *_PREFIXED.finditer(source)):
            token = match.group(1)
            if not _plausible(token):
                continue
            distance = min(abs(match.start() - position) for position in keywords)
            if distance > _WINDOW:
                continue
            # "123 456" and "123-456" are one numeric code; "ABC-123" keeps its hyphen.
            code = re.sub(r"[- ]", "", token) if re.fullmatch(r"[\d -]+", token) else token
            score = (source_rank, distance)
            if code not in ranked or score < ranked[code]:
                ranked[code] = score
    return [code for code, _ in sorted(ranked.items(), key=lambda item: item[1])][:MAX_CODES]


def _tidy(url: str) -> str:
    return url.rstrip(".,;:!?")


def links_extract(text: str, raw_html: str) -> list[dict[str, str]]:
    """Links as ``{"url", "text"}``, HTML anchors first (they carry anchor text), deduplicated."""
    links: dict[str, str] = {}
    if raw_html:
        for href, anchor_text in html_anchors(raw_html[:2_000_000], limit=4 * MAX_LINKS):
            href = href.strip()
            if href.lower().startswith(("http://", "https://")) and len(href) <= 4000:
                links.setdefault(href, anchor_text[:500])
    for match in _URL.finditer((text or "")[:2_000_000]):
        url = _tidy(match.group(0))
        if len(url) <= 4000:
            links.setdefault(url, "")
        if len(links) >= MAX_LINKS:
            break
    return [{"url": url, "text": anchor} for url, anchor in list(links.items())[:MAX_LINKS]]
