"""The Gmail-style search language, compiled to a queryset filter.

Grammar (terms are ANDed)::

    query    := term*
    term     := ["-"] (operator ":" value | value)
    value    := word | '"' phrase '"'
    operator := from | to | subject | has | is | tag | before | after | larger | smaller | in | thread | auth

``in:sent`` is the mail sent from the mailboxes, ``in:<mailbox>`` one mailbox's;
``has:attachment``, ``is:read`` / ``is:unread``, ``before:``/``after:`` take ``YYYY-MM-DD``
(or ``YYYY/MM/DD``), ``larger:``/``smaller:`` take a size with an optional K, M or G
suffix. ``from:``, ``to:`` and ``subject:`` match case-insensitive substrings of the
sender (name or address), the recipients (To, Cc and the envelope recipient) and the
subject. ``auth:<mechanism>=<result>`` matches the trust verdicts we verified
(``auth:dmarc=fail``, ``auth:dkim=pass``, ``auth:spf=softfail``, ``auth:arc=pass``; see
mailboxes/authentication.py: ``dkim=pass`` when any signature passes). Free words and
quoted phrases use PostgreSQL full-text search over the weighted document
(:func:`mailboxes.pipeline.search_vector_expression`); on SQLite the same query is
answered with substring matches over subject, addresses, body and attachment names.

A malformed query raises :class:`QuerySyntaxError` with the character position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from django.contrib.postgres.search import SearchQuery
from django.db import connection
from django.db.models import Q, QuerySet
from django.db.models.expressions import RawSQL

from mailboxes.authentication import RESULTS as AUTH_RESULTS
from mailboxes.models import Message

OPERATORS = frozenset(
    {"from", "to", "subject", "has", "is", "tag", "before", "after", "larger", "smaller", "thread", "in", "auth"}
)
MAX_QUERY = 1000
MAX_TERMS = 30
_SIZE = re.compile(r"^(\d{1,12})([kmg]b?|b)?$", re.IGNORECASE)
_TEXT_CONFIG = "simple"


class QuerySyntaxError(ValueError):
    """A query that does not parse; ``position`` is the 0-based character offset."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} (at character {position + 1})")
        self.position = position


@dataclass(frozen=True)
class Term:
    negated: bool
    operator: str | None  # None: free text
    value: str
    phrase: bool
    position: int


def query_parse(query: str) -> list[Term]:
    """Tokenize a query into terms; raises :class:`QuerySyntaxError`."""
    if len(query) > MAX_QUERY:
        raise QuerySyntaxError(f"The query is longer than {MAX_QUERY} characters", MAX_QUERY)
    if "\x00" in query:
        raise QuerySyntaxError("NUL is not allowed in a query", query.index("\x00"))
    terms: list[Term] = []
    index, length = 0, len(query)
    while index < length:
        if query[index].isspace():
            index += 1
            continue
        start = index
        negated = False
        if query[index] == "-":
            negated = True
            index += 1
            if index >= length or query[index].isspace():
                raise QuerySyntaxError("'-' must be followed by a term", start)
        operator = None
        match = re.match(r"([A-Za-z]+):", query[index:])
        if match:
            name = match.group(1).lower()
            if name not in OPERATORS:
                raise QuerySyntaxError(f"Unknown operator '{match.group(1)}:'", index)
            operator = name
            index += len(match.group(0))
            if index >= length or query[index].isspace():
                raise QuerySyntaxError(f"'{name}:' needs a value", start)
        phrase = False
        if query[index] == '"':
            end = query.find('"', index + 1)
            if end == -1:
                raise QuerySyntaxError("Unterminated quoted phrase", index)
            value = query[index + 1 : end]
            index = end + 1
            phrase = True
            if not value.strip():
                raise QuerySyntaxError("Empty quoted phrase", start)
        else:
            end = index
            while end < length and not query[end].isspace():
                if query[end] == '"':
                    raise QuerySyntaxError("A quote must start a term", end)
                end += 1
            value = query[index:end]
            index = end
        terms.append(Term(negated=negated, operator=operator, value=value, phrase=phrase, position=start))
        if len(terms) > MAX_TERMS:
            raise QuerySyntaxError(f"More than {MAX_TERMS} terms", start)
    return terms


def _date(term: Term) -> datetime:
    for pattern in ("%Y-%m-%d", "%Y/%m/%d"):
        try:
            return datetime.strptime(term.value, pattern).replace(tzinfo=UTC)
        except ValueError:
            continue
    raise QuerySyntaxError(f"'{term.operator}:' takes a date like 2025-01-31, not '{term.value}'", term.position)


def _size(term: Term) -> int:
    match = _SIZE.match(term.value)
    if not match:
        raise QuerySyntaxError(f"'{term.operator}:' takes a size like 10K or 2M, not '{term.value}'", term.position)
    unit = (match.group(2) or "b")[0].lower()
    return int(match.group(1)) * {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]


def _tag(value: str) -> Q:
    tag = value.lower()
    if connection.vendor == "postgresql":
        return Q(tags__contains=[tag])
    # SQLite has no JSON containment: look the tag up in json_each.
    return Q(
        pk__in=RawSQL(
            "SELECT m.id FROM mailboxes_message m, json_each(m.tags) t WHERE t.value = %s",
            (tag,),
        )
    )


def _auth(term: Term) -> Q:
    """``auth:dmarc=fail``: one mechanism's verdict (the auth_* columns of Message)."""
    mechanism, _, result = term.value.lower().partition("=")
    if mechanism not in AUTH_RESULTS:
        raise QuerySyntaxError(
            f"'auth:' takes spf, dkim, dmarc or arc, then = and a result, like auth:dmarc=fail, not '{term.value}'",
            term.position,
        )
    if result not in AUTH_RESULTS[mechanism]:
        choices = ", ".join(AUTH_RESULTS[mechanism])
        raise QuerySyntaxError(f"'auth:{mechanism}=' takes one of {choices}, not '{result}'", term.position)
    return Q(**{f"auth_{mechanism}": result})


def _text(term: Term) -> Q:
    if connection.vendor == "postgresql":
        search_type = "phrase" if term.phrase else "plain"
        return Q(search_vector=SearchQuery(term.value, config=_TEXT_CONFIG, search_type=search_type))
    value = term.value
    return (
        Q(subject__icontains=value)
        | Q(from_name__icontains=value)
        | Q(from_address__icontains=value)
        | Q(recipients_text__icontains=value)
        | Q(text__icontains=value)
        | Q(attachment_names__icontains=value)
    )


def _condition(term: Term) -> Q:
    operator, value = term.operator, term.value
    if operator is None:
        return _text(term)
    if operator == "from":
        return Q(from_address__icontains=value) | Q(from_name__icontains=value) | Q(mail_from__icontains=value)
    if operator == "to":
        return Q(recipients_text__icontains=value)
    if operator == "subject":
        return Q(subject__icontains=value)
    if operator == "has":
        if value.lower() in {"attachment", "attachments"}:
            return Q(has_attachments=True)
        if value.lower() == "code":
            return ~Q(codes=[])
        raise QuerySyntaxError(f"'has:' takes 'attachment' or 'code', not '{value}'", term.position)
    if operator == "is":
        if value.lower() == "read":
            return Q(is_read=True)
        if value.lower() == "unread":
            return Q(is_read=False)
        if value.lower() == "quarantined":
            return Q(state=Message.State.QUARANTINED)
        raise QuerySyntaxError(f"'is:' takes 'read', 'unread' or 'quarantined', not '{value}'", term.position)
    if operator == "tag":
        return _tag(value)
    if operator == "before":
        return Q(received_at__lt=_date(term))
    if operator == "after":
        return Q(received_at__gte=_date(term))
    if operator == "larger":
        return Q(size__gt=_size(term))
    if operator == "smaller":
        return Q(size__lt=_size(term))
    if operator == "thread":
        return Q(thread_id=value)
    if operator == "in":
        if value.lower() == "sent":  # what the tenant sent (outbound/sent.py), like Gmail's in:sent
            return Q(is_sent=True)
        return Q(mailbox__address__iexact=value) | Q(mailbox__local_part__iexact=value)
    if operator == "auth":
        return _auth(term)
    raise QuerySyntaxError(f"Unknown operator '{operator}:'", term.position)  # pragma: no cover


def query_filter(queryset: QuerySet[Message], query: str) -> QuerySet[Message]:
    """Apply a search query to ``queryset``; raises :class:`QuerySyntaxError`."""
    condition = Q()
    for term in query_parse(query):
        piece = _condition(term)
        condition &= ~piece if term.negated else piece
    return queryset.filter(condition) if condition else queryset
