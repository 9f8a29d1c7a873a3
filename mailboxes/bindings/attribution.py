"""Which provider a message comes from: the From domain or the subject.

A provider (mailboxes.models.AccountProvider) lists sender domains (``accounts.google.com``
also matches ``mail.accounts.google.com``) and subject patterns (case-insensitive regular
expressions). In a mailbox shared by accounts of several providers, a code reaches an
account only through a message its provider's rules match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from django.core.exceptions import ValidationError
from django.db.models import Q

from tenants.services import domain_name_normalize

MAX_RULES = 50
MAX_PATTERN = 200
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,39}$")


def provider_name_normalize(name: str) -> str:
    candidate = (name or "").strip().lower()
    if not _NAME.match(candidate):
        raise ValidationError(
            {"provider": "A short name: letters, digits and . _ - (at most 40), such as google or github."},
            code="invalid",
        )
    return candidate


def sender_domains_normalize(domains: Iterable[str]) -> list[str]:
    cleaned = sorted({domain_name_normalize(domain) for domain in domains})
    if len(cleaned) > MAX_RULES:
        raise ValidationError({"sender_domains": f"At most {MAX_RULES} domains."})
    return cleaned


def subject_patterns_normalize(patterns: Iterable[str]) -> list[str]:
    cleaned = []
    for pattern in patterns:
        if not pattern or len(pattern) > MAX_PATTERN:
            raise ValidationError({"subject_patterns": f"Each pattern: 1 to {MAX_PATTERN} characters."})
        # The database evaluates them (PostgreSQL ~*); keep to the syntax both sides share.
        if re.search(r"\(\?[^:]|\\[pPkgZ]", pattern):
            raise ValidationError({"subject_patterns": f"{pattern!r}: look-arounds and named groups are not accepted."})
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValidationError({"subject_patterns": f"{pattern!r}: {error}."}) from None
        cleaned.append(pattern)
    if len(cleaned) > MAX_RULES:
        raise ValidationError({"subject_patterns": f"At most {MAX_RULES} patterns."})
    return cleaned


def provider_filter(sender_domains: Iterable[str], subject_patterns: Iterable[str]) -> Q | None:
    """A message filter for the provider's rules; None when it has no rules."""
    condition = Q(pk__in=[])
    rules = 0
    for domain in sender_domains:
        condition |= Q(from_address__iendswith=f"@{domain}") | Q(from_address__iendswith=f".{domain}")
        rules += 1
    for pattern in subject_patterns:
        condition |= Q(subject__iregex=pattern)
        rules += 1
    return condition if rules else None


def provider_matches(
    sender_domains: Iterable[str], subject_patterns: Iterable[str], *, sender: str, subject: str
) -> bool:
    """The same rules in Python (the console's preview and the tests)."""
    domain = sender.rpartition("@")[2].lower()
    if any(domain == rule or domain.endswith(f".{rule}") for rule in sender_domains):
        return True
    return any(re.search(pattern, subject or "", re.IGNORECASE) for pattern in subject_patterns)
