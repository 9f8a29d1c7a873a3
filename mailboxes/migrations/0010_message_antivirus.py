from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("mailboxes", "0009_message_uid"),
    ]

    operations = [
        migrations.AddField(
            model_name="message",
            name="antivirus_verdict",
            field=models.CharField(
                blank=True,
                choices=[
                    ("", "Not scanned"),
                    ("clean", "Clean"),
                    ("infected", "Infected"),
                    ("error", "Scan failed, rescan due"),
                    ("too_large", "Larger than the scanner takes"),
                ],
                max_length=16,
            ),
        ),
        migrations.AddField(
            model_name="message",
            name="antivirus_signature",
            field=models.CharField(blank=True, help_text="What clamd found", max_length=255),
        ),
        migrations.AddField(
            model_name="message",
            name="antivirus_scanned_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name="message",
            index=models.Index(
                condition=models.Q(("antivirus_verdict", "error")),
                fields=["antivirus_scanned_at"],
                name="message_rescan_due",
            ),
        ),
    ]
