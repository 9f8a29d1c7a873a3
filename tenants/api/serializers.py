from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import serializers

from tenants.access import ALL_PERMISSIONS
from tenants.models import ApiKey, Domain, Tenant


class TenantSerializer(serializers.ModelSerializer[Tenant]):
    class Meta:
        model = Tenant
        fields = ["id", "slug", "name", "plan", "status", "created_at"]
        read_only_fields = ["id", "slug", "plan", "status", "created_at"]


class TenantUpdateSerializer(serializers.Serializer[Any]):
    name = serializers.CharField(max_length=200)


class DnsRecordSerializer(serializers.Serializer[Any]):
    type = serializers.CharField()
    name = serializers.CharField()
    value = serializers.CharField()
    priority = serializers.IntegerField(required=False)


class DomainSerializer(serializers.ModelSerializer[Domain]):
    dns_records = serializers.SerializerMethodField()

    class Meta:
        model = Domain
        fields = [
            "id",
            "name",
            "state",
            "state_reason",
            "recipient_policy",
            "verified_at",
            "last_checked_at",
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


class DomainCreateSerializer(serializers.Serializer[Any]):
    name = serializers.CharField(max_length=253)
    recipient_policy = serializers.ChoiceField(choices=Domain.RecipientPolicy.choices, required=False)


class DomainUpdateSerializer(serializers.Serializer[Any]):
    recipient_policy = serializers.ChoiceField(choices=Domain.RecipientPolicy.choices)


class ApiKeySerializer(serializers.ModelSerializer[ApiKey]):
    domains = serializers.SerializerMethodField()
    mailboxes = serializers.SerializerMethodField()

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "name",
            "last_four",
            "permissions",
            "domains",
            "mailboxes",
            "expires_at",
            "revoked_at",
            "last_used_at",
            "created_at",
        ]
        read_only_fields = fields

    def get_domains(self, api_key: ApiKey) -> list[str]:
        return [str(domain.pk) for domain in api_key.allowed_domains.all()]

    def get_mailboxes(self, api_key: ApiKey) -> list[str]:
        return [str(mailbox.pk) for mailbox in api_key.allowed_mailboxes.all()]


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.SerializerMethodField(help_text="The secret. Shown only in this response.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]
        read_only_fields = fields

    def get_key(self, api_key: ApiKey) -> str:
        return str(self.context["secret"])


class ApiKeyCreateSerializer(serializers.Serializer[Any]):
    name = serializers.CharField(max_length=200)
    permissions = serializers.ListField(
        child=serializers.ChoiceField(choices=sorted(ALL_PERMISSIONS)), allow_empty=False, max_length=20
    )
    domains = serializers.ListField(child=serializers.UUIDField(), required=False, default=list, max_length=1000)
    mailboxes = serializers.ListField(child=serializers.UUIDField(), required=False, default=list, max_length=1000)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)
