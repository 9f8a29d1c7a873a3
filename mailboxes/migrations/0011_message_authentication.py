from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("mailboxes", "0010_message_antivirus"),
    ]

    operations = [
        migrations.AddField(
            model_name="message",
            name="auth_spf",
            field=models.CharField(blank=True, max_length=16),
        ),
        migrations.AddField(
            model_name="message",
            name="auth_dkim",
            field=models.CharField(blank=True, max_length=16),
        ),
        migrations.AddField(
            model_name="message",
            name="auth_dmarc",
            field=models.CharField(blank=True, max_length=16),
        ),
        migrations.AddField(
            model_name="message",
            name="auth_arc",
            field=models.CharField(blank=True, max_length=16),
        ),
        migrations.AddField(
            model_name="message",
            name="authentication",
            field=models.JSONField(blank=True, null=True),
        ),
    ]
