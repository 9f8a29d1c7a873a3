from typing import Any

from django.apps import AppConfig
from django.db.models.signals import m2m_changed


def _allow_list_changed(sender: Any, instance: Any, **kwargs: Any) -> None:
    """A key's allow-list written in this process (its mint, the admin, a test): forget what
    the process keeps of it (tenants.access.GRANTS_TTL bounds the others)."""
    from tenants.access import grants_forget
    from tenants.models import ApiKey

    grants_forget(instance.pk if isinstance(instance, ApiKey) else None)


class TenantsConfig(AppConfig):
    name = "tenants"
    verbose_name = "Tenants"

    def ready(self) -> None:
        from tenants.api import schema  # noqa: F401  (registers the OpenAPI auth scheme)
        from tenants.models import ApiKey

        for field in ("allowed_domains", "allowed_mailboxes", "allowed_pools"):
            m2m_changed.connect(
                _allow_list_changed, sender=getattr(ApiKey, field).through, dispatch_uid=f"grants-{field}"
            )
