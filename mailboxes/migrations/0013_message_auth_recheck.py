from django.db import migrations, models


def temperrors_due(apps, schema_editor):  # type: ignore[no-untyped-def]
    """Verdicts stored with a temperror before re-checks existed: due now, once."""
    from django.db.models import Q
    from django.utils import timezone

    Message = apps.get_model("mailboxes", "Message")
    Message.objects.filter(
        Q(auth_spf="temperror") | Q(auth_dkim="temperror") | Q(auth_dmarc="temperror"), deleted_at__isnull=True
    ).update(auth_recheck_at=timezone.now())


class Migration(migrations.Migration):
    dependencies = [
        ("mailboxes", "0012_message_is_sent"),
    ]

    operations = [
        migrations.AddField(
            model_name="message",
            name="auth_recheck_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name="message",
            index=models.Index(
                condition=models.Q(("auth_recheck_at__isnull", False)),
                fields=["auth_recheck_at"],
                name="message_auth_recheck_due",
            ),
        ),
        migrations.RunPython(temperrors_due, migrations.RunPython.noop),
    ]
