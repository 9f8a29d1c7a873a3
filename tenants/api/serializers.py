from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import serializers

from mailplatform.api import StrictSerializer
from tenants.access import ALL_PERMISSIONS
from tenants.models import AntivirusMode, ApiKey, Domain, SsoProvider, Tenant


def _antivirus_mode_shown(whose: str) -> serializers.ChoiceField:
    # The model's choices leave out "" (inherit), which is what most tenants and domains hold.
    return serializers.ChoiceField(
        choices=["", *AntivirusMode.values], read_only=True, help_text=f"{whose}; empty: inherited"
    )


class TenantSerializer(serializers.ModelSerializer[Tenant]):
    antivirus_mode = _antivirus_mode_shown("The tenant's antivirus mode (off, tag, quarantine, reject)")

    class Meta:
        model = Tenant
        fields = [
            "id",
            "slug",
            "name",
            "plan",
            "status",
            "ip_allowlist",
            "retention_days",
            "antivirus_mode",
            "created_at",
        ]
        read_only_fields = fields


def _cidr_list(**kwargs: Any) -> serializers.ListField:
    return serializers.ListField(child=serializers.CharField(max_length=64), max_length=500, **kwargs)


class TenantUpdateSerializer(StrictSerializer):
    output_serializer_class = TenantSerializer

    name = serializers.CharField(max_length=200, required=False)
    ip_allowlist = _cidr_list(required=False, help_text="CIDRs that may use the console and API keys; [] for anywhere")
    retention_days = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=3650,
        help_text="Days mail is kept unless a mailbox says otherwise; null for the platform default",
    )
    antivirus_mode = serializers.ChoiceField(
        choices=["", *AntivirusMode.values],
        required=False,
        help_text="What a virus found by clamd does to this tenant's mail (domains may override): off, tag,"
        " quarantine, or reject (554 before the 250); empty for the platform's ANTIVIRUS_MODE",
    )


class DnsRecordSerializer(serializers.Serializer[Any]):
    type = serializers.CharField()
    name = serializers.CharField()
    value = serializers.CharField()
    priority = serializers.IntegerField(required=False)


class DomainSerializer(serializers.ModelSerializer[Domain]):
    dns_records = serializers.SerializerMethodField()
    antivirus_mode = _antivirus_mode_shown("The domain's antivirus mode (off, tag, quarantine, reject)")

    class Meta:
        model = Domain
        fields = [
            "id",
            "name",
            "state",
            "state_reason",
            "recipient_policy",
            "dmarc_reject",
            "antivirus_mode",
            "verified_at",
            "last_checked_at",
            "txt_ok",
            "mx_ok",
            "last_check_error",
            "dns_records",
            "created_at",
        ]
        read_only_fields = fields

    def get_dns_records(self, domain: Domain) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = [
            {"type": "TXT", "name": domain.name, "value": domain.verification_record},
        ]
        for priority, host in enumerate(getattr(settings, "MX_HOSTS", []) or [], start=1):
            records.append({"type": "MX", "name": domain.name, "value": host, "priority": priority * 10})
        return records


class DomainCreateSerializer(StrictSerializer):
    output_serializer_class = DomainSerializer

    name = serializers.CharField(max_length=253)
    recipient_policy = serializers.ChoiceField(choices=Domain.RecipientPolicy.choices, required=False)


class DomainUpdateSerializer(StrictSerializer):
    output_serializer_class = DomainSerializer

    recipient_policy = serializers.ChoiceField(choices=Domain.RecipientPolicy.choices, required=False)
    dmarc_reject = serializers.BooleanField(
        required=False,
        help_text="Refuse at DATA (550 5.7.1) SMTP mail that fails DMARC while its From domain publishes p=reject;"
        " a DNS failure defers it (451 4.7.0). Off by default: forwarded and mailing-list mail can fail"
        " DMARC (RFC 7489 section 10.3)",
    )
    antivirus_mode = serializers.ChoiceField(
        choices=["", *AntivirusMode.values],
        required=False,
        help_text="What a virus found by clamd does to this domain's mail: off, tag, quarantine, or reject"
        " (554 5.7.1 before the 250); empty for the tenant's mode",
    )


class ApiKeySerializer(serializers.ModelSerializer[ApiKey]):
    domains = serializers.SerializerMethodField()
    mailboxes = serializers.SerializerMethodField()
    pools = serializers.SerializerMethodField()

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "name",
            "last_four",
            "permissions",
            "domains",
            "mailboxes",
            "pools",
            "ip_allowlist",
            "expires_at",
            "revoked_at",
            "last_used_at",
            "parent",
            "created_at",
        ]
        read_only_fields = fields
        extra_kwargs = {"parent": {"help_text": "The key that minted this one: it is never wider and dies with it"}}

    def get_domains(self, api_key: ApiKey) -> list[str]:
        return [str(domain.pk) for domain in api_key.allowed_domains.all()]

    def get_mailboxes(self, api_key: ApiKey) -> list[str]:
        return [str(mailbox.pk) for mailbox in api_key.allowed_mailboxes.all()]

    def get_pools(self, api_key: ApiKey) -> list[str]:
        return [str(pool.pk) for pool in api_key.allowed_pools.all()]


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.SerializerMethodField(help_text="The secret. Shown only in this response.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]
        read_only_fields = fields

    def get_key(self, api_key: ApiKey) -> str:
        return str(self.context["secret"])


class ApiKeyCreateSerializer(StrictSerializer):
    output_serializer_class = ApiKeySerializer

    name = serializers.CharField(max_length=200)
    permissions = serializers.ListField(
        child=serializers.ChoiceField(choices=sorted(ALL_PERMISSIONS)), allow_empty=False, max_length=20
    )
    domains = serializers.ListField(child=serializers.UUIDField(), required=False, default=list, max_length=1000)
    mailboxes = serializers.ListField(child=serializers.UUIDField(), required=False, default=list, max_length=1000)
    pools = serializers.ListField(
        child=serializers.UUIDField(), required=False, default=list, max_length=1000, help_text="Mailbox pools"
    )
    expires_at = serializers.DateTimeField(required=False, allow_null=True)
    ip_allowlist = _cidr_list(required=False, default=list, help_text="CIDRs this key may be used from")


class DomainCheckSerializer(serializers.Serializer[Any]):
    txt = serializers.BooleanField()
    mx = serializers.BooleanField()
    error = serializers.CharField(allow_null=True)
    state = serializers.CharField()


class DomainVerifySerializer(DomainSerializer):
    check = serializers.SerializerMethodField()

    class Meta(DomainSerializer.Meta):
        fields = [*DomainSerializer.Meta.fields, "check"]
        read_only_fields = fields

    def get_check(self, domain: Domain) -> dict[str, Any]:
        return dict(self.context["check"])


class SsoProviderSerializer(serializers.ModelSerializer[SsoProvider]):
    email_domains = serializers.ListField(child=serializers.CharField(), read_only=True)
    redirect_uri = serializers.SerializerMethodField(help_text="Register this callback with your provider")

    class Meta:
        model = SsoProvider
        fields = [
            "issuer",
            "client_id",
            "scopes",
            "email_domains",
            "default_role",
            "role_claim",
            "role_mapping",
            "require_sso",
            "enabled",
            "redirect_uri",
            "updated_at",
        ]
        read_only_fields = fields

    def get_redirect_uri(self, provider: SsoProvider) -> str:
        from tenants.sso import callback_url

        return callback_url()


class SsoConfigureSerializer(StrictSerializer):
    output_serializer_class = SsoProviderSerializer

    issuer = serializers.URLField(max_length=500)
    client_id = serializers.CharField(max_length=255)
    client_secret = serializers.CharField(
        max_length=2000, required=False, write_only=True, help_text="Omit to keep the current secret"
    )
    email_domains = serializers.ListField(
        child=serializers.CharField(max_length=253),
        min_length=1,
        max_length=100,
        help_text="The e-mail domains your people use; each must be a verified domain of this tenant "
        "(else sso_domain_not_verified), and stops signing anyone in if its DNS TXT record goes",
    )
    scopes = serializers.CharField(max_length=255, required=False, default="openid email profile")
    default_role = serializers.ChoiceField(choices=SsoProvider.Role.choices, required=False, default="member")
    role_claim = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")
    role_mapping = serializers.DictField(
        child=serializers.ChoiceField(choices=SsoProvider.Role.choices), required=False, default=dict
    )
    require_sso = serializers.BooleanField(required=False, default=False)
    enabled = serializers.BooleanField(required=False, default=True)
