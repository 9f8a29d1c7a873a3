from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("tenants", "0004_domain_claims_platform_managed_key_parents"),
    ]

    operations = [
        migrations.AddField(
            model_name="domain",
            name="dmarc_reject",
            field=models.BooleanField(default=False),
        ),
    ]
