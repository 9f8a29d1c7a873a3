"""Many rows written by one statement whose values are one JSON document (PostgreSQL).

Django's ``bulk_create`` compiles a placeholder per column and row and psycopg's client-side
binding quotes each of them in Python: for the write side of the mail path (a batch's
``indexer.indexed`` events, their webhook deliveries, the attachments) that cost more CPU
than the statement itself. Here the rows travel as one parameter, one ``json.dumps``, read
back by ``json_to_recordset`` in the statement (as ``mailboxes.pipeline._messages_update``
does for the parsed rows' UPDATE). SQLite, the embedded default, keeps ``bulk_create``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any, TypeVar, cast
from uuid import UUID

from django.db import connections, models

ModelT = TypeVar("ModelT", bound=models.Model)


def json_value(value: object) -> str:
    """What :func:`json.dumps` cannot write itself, as PostgreSQL reads it (UUIDs, timestamps)."""
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def rows_insert(
    objs: Sequence[ModelT],
    *,
    returning: Sequence[str] = (),
    match: str = "pk",
    using: str = "default",
) -> list[ModelT]:
    """INSERT ``objs`` (unsaved instances of one model) with one statement, in their order.

    Every concrete column is written except those the database fills (an auto primary key,
    a ``db_default``); ``pre_save`` runs as for ``save()`` (``auto_now`` stamps). The
    ``returning`` fields (an auto primary key, a ``db_default`` such as the event's
    transaction id) are set on the instances from ``RETURNING``, each row matched to its
    instance by ``match``, a unique field the instance already holds (its primary key
    unless that is an auto field). Rows are inserted in the order given (``ORDER BY`` the
    document's ordinality), so sequence values are handed out in that order. On another
    database than PostgreSQL (SQLite, the embedded default): ``bulk_create``.
    """
    if not objs:
        return []
    model = type(objs[0])
    connection = connections[using]
    if connection.vendor != "postgresql":
        return list(model._default_manager.using(using).bulk_create(objs))
    meta = model._meta
    fields = [
        cast("models.Field[Any, Any]", field)
        for field in meta.concrete_fields
        if not (isinstance(field, models.AutoField) or field.db_default is not models.NOT_PROVIDED)
    ]
    key = cast("models.Field[Any, Any]", meta.pk if match == "pk" else meta.get_field(match))
    if key not in fields:
        raise ValueError(f"{meta.label}.{key.name} is filled by the database: match on a field the rows hold")
    back = [cast("models.Field[Any, Any]", meta.get_field(name)) for name in returning]
    documents = [{field.column: field.pre_save(obj, True) for field in fields} for obj in objs]
    columns = ", ".join(f'"{field.column}"' for field in fields)
    record = ", ".join(f'"{field.column}" {field.db_type(connection)}' for field in fields)
    names = ", ".join([*(f'"{field.column}"' for field in fields), "ordinality"])
    values = ", ".join(f'v."{field.column}"' for field in fields)
    returned = ", ".join(f'"{field.column}"' for field in (key, *back))
    sql = (
        f'INSERT INTO "{meta.db_table}" ({columns}) SELECT {values}'  # noqa: S608 (names from the model)
        f" FROM ROWS FROM (json_to_recordset(%s::json) AS ({record})) WITH ORDINALITY AS v({names})"
        f" ORDER BY v.ordinality{f' RETURNING {returned}' if back else ''}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [json.dumps(documents, ensure_ascii=False, default=json_value)])
        rows = {str(row[0]): row[1:] for row in cursor.fetchall()} if back else {}
    for obj, document in zip(objs, documents, strict=True):
        for field, value in zip(back, rows[str(document[key.column])] if back else (), strict=True):
            setattr(obj, field.attname, value)
        obj._state.adding = False
        obj._state.db = using
    return list(objs)
