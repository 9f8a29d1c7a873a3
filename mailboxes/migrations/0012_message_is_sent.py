from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("mailboxes", "0011_message_authentication"),
        ("mailboxes", "0011_pools_bindings"),
    ]

    operations = [
        migrations.AddField(
            model_name="message",
            name="is_sent",
            field=models.BooleanField(default=False),
        ),
    ]
