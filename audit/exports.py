"""The audit trail as a downloadable file (CSV or JSON), streamed; used by the API and the console.

CSV cells are escaped against formula injection: a spreadsheet runs a cell that starts with
``=``, ``+``, ``-`` or ``@`` (or tab or carriage return, which some strip before reading) as a
formula, and the trail holds text that callers chose, such as user agents. Such a cell gets a
leading single quote, as OWASP's CSV Injection guidance advises; JSON is left as it is.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

from django.db.models import QuerySet
from django.http import StreamingHttpResponse

from audit.models import AuditEntry

EXPORT_MAX_ROWS = 100_000
FORMATS = ("csv", "json")
FIELDS = [
    "id",
    "created_at",
    "actor_type",
    "actor",
    "anonymous",
    "ip",
    "user_agent",
    "action",
    "resource_type",
    "resource_id",
    "before",
    "after",
    "correlation_id",
]


def audit_entry_row(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": str(entry.pk),
        "created_at": entry.created_at.isoformat(),
        "actor_type": entry.actor_type,
        "actor": entry.actor_label,
        "anonymous": entry.anonymous,
        "ip": entry.ip,
        "user_agent": entry.user_agent,
        "action": entry.action,
        "resource_type": entry.resource_type,
        "resource_id": entry.resource_id,
        "before": entry.before,
        "after": entry.after,
        "correlation_id": entry.correlation_id,
    }


def audit_export_response(entries: QuerySet[AuditEntry], kind: str) -> StreamingHttpResponse:
    """Stream at most EXPORT_MAX_ROWS entries; ``kind`` is one of FORMATS."""
    rows = (audit_entry_row(entry) for entry in entries[:EXPORT_MAX_ROWS].iterator(2000))
    stream, content_type = (_csv(rows), "text/csv") if kind == "csv" else (_json(rows), "application/json")
    response = StreamingHttpResponse(stream, content_type=f"{content_type}; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="audit.{kind}"'
    return response


def _csv(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: csv_cell(value) for key, value in row.items()})
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """One value as a CSV cell that a spreadsheet shows as text, never runs as a formula."""
    if isinstance(value, dict | list):
        value = json.dumps(value)
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def _json(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    yield "["
    for index, row in enumerate(rows):
        yield ("," if index else "") + json.dumps(row, default=str)
    yield "]"
