from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('mailboxes', '0011_pools_bindings'),
        ('tenants', '0006_antivirus_modes'),
    ]

    operations = [
        migrations.AddField(
            model_name='apikey',
            name='allowed_pools',
            field=models.ManyToManyField(blank=True, related_name='+', to='mailboxes.mailboxpool'),
        ),
    ]
