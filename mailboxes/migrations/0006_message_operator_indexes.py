"""Indexes for the search operators that are not full-text (PostgreSQL only; SQLite scans).

``from:``, ``to:`` and ``subject:`` are case-insensitive substring matches, which Django
writes as ``UPPER(col::text) LIKE UPPER('%value%')``: trigram GIN indexes on exactly those
expressions (pg_trgm, a trusted extension since PostgreSQL 13) serve them, and ANALYZE's
statistics on the indexed expressions give the planner real selectivities, so it walks the
newest-first index for common values and uses the trigram index for rare ones. ``tag:`` is
JSON containment (``tags @> '["x"]'``): a jsonb_path_ops GIN index.

Full-text search is always within one tenant (``Principal.scope``), so its GIN index leads
with ``tenant_id`` (btree_gin, also trusted) and replaces the plain one of migration 0004:
a rare word no longer intersects a bitmap of the whole tenant (bench/search.py: 59 -> 27 ms).
"""

from django.db import migrations

INDEXES = {
    "message_subject_trgm": "USING gin (upper(subject::text) gin_trgm_ops)",
    "message_from_address_trgm": "USING gin (upper(from_address::text) gin_trgm_ops)",
    "message_from_name_trgm": "USING gin (upper(from_name::text) gin_trgm_ops)",
    "message_mail_from_trgm": "USING gin (upper(mail_from::text) gin_trgm_ops)",
    "message_recipients_trgm": "USING gin (upper(recipients_text) gin_trgm_ops)",
    "message_tags_gin": "USING gin (tags jsonb_path_ops)",
    "message_tenant_search_gin": "USING gin (tenant_id, search_vector)",
}


def _create(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    schema_editor.execute("CREATE EXTENSION IF NOT EXISTS btree_gin")
    for name, definition in INDEXES.items():
        schema_editor.execute(f"CREATE INDEX IF NOT EXISTS {name} ON mailboxes_message {definition}")
    schema_editor.execute("DROP INDEX IF EXISTS message_search_gin")


def _drop(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(
        "CREATE INDEX IF NOT EXISTS message_search_gin ON mailboxes_message USING gin (search_vector)"
    )
    for name in INDEXES:
        schema_editor.execute(f"DROP INDEX IF EXISTS {name}")


class Migration(migrations.Migration):
    dependencies = [("mailboxes", "0005_alter_message_mailbox")]
    operations = [migrations.RunPython(_create, _drop, elidable=False)]
