"""Verdicts stored before IMAP and POP3 presented them: their presentation, and new UIDs
(mailboxes.presentation.messages_presentation_backfill). Not atomic: one transaction a batch."""

from typing import Any

from django.db import migrations


def backfill(apps: Any, schema_editor: Any) -> None:
    from mailboxes.presentation import messages_presentation_backfill

    messages_presentation_backfill(
        message_model=apps.get_model("mailboxes", "Message"), mailbox_model=apps.get_model("mailboxes", "Mailbox")
    )


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("mailboxes", "0015_message_imap_presentation"),
    ]

    operations = [
        migrations.RunPython(backfill, migrations.RunPython.noop, elidable=True),
    ]
