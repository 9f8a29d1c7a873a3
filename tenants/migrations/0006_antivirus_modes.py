from django.db import migrations, models

MODES = [
    ("off", "Not scanned"),
    ("tag", "Accepted, tagged virus"),
    ("quarantine", "Accepted, quarantined"),
    ("reject", "Refused before the 250 (554 5.7.1)"),
]


class Migration(migrations.Migration):
    dependencies = [
        ("tenants", "0005_domain_dmarc_reject"),
    ]

    operations = [
        migrations.AddField(
            model_name="tenant",
            name="antivirus_mode",
            field=models.CharField(blank=True, choices=MODES, max_length=16),
        ),
        migrations.AddField(
            model_name="domain",
            name="antivirus_mode",
            field=models.CharField(blank=True, choices=MODES, max_length=16),
        ),
    ]
