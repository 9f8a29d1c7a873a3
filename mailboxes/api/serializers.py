from __future__ import annotations

from typing import Any

from rest_framework import serializers

from mailboxes.models import Mailbox
from mailplatform.api import StrictSerializer


class MailboxSerializer(serializers.ModelSerializer[Mailbox]):
    domain_name = serializers.CharField(source="domain.name", read_only=True)

    class Meta:
        model = Mailbox
        fields = [
            "id",
            "address",
            "local_part",
            "domain",
            "domain_name",
            "name",
            "kind",
            "is_catch_all",
            "expires_at",
            "retention_days",
            "created_at",
        ]
        read_only_fields = fields


class MailboxCreateSerializer(StrictSerializer):
    output_serializer_class = MailboxSerializer
    # An address, or a domain id with an optional local part (validate() says the same).
    schema_constraints = {
        "oneOf": [
            {"required": ["address"], "not": {"anyOf": [{"required": ["domain"]}, {"required": ["local_part"]}]}},
            {"required": ["domain"], "not": {"required": ["address"]}},
        ]
    }

    address = serializers.EmailField(required=False, max_length=320, help_text="local@domain, on one of your domains")
    domain = serializers.UUIDField(required=False, help_text="The domain's id (instead of address)")
    local_part = serializers.CharField(
        required=False, max_length=64, help_text="With domain; omitted means a random address"
    )
    name = serializers.CharField(required=False, allow_blank=True, max_length=200)
    is_catch_all = serializers.BooleanField(required=False, default=False)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)
    retention_days = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=3650)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "address" in attrs and ("domain" in attrs or "local_part" in attrs):
            raise serializers.ValidationError("Give either address, or domain with an optional local_part.")
        if "address" not in attrs and "domain" not in attrs:
            raise serializers.ValidationError("Give an address, or a domain id.")
        return attrs


class MailboxUpdateSerializer(StrictSerializer):
    output_serializer_class = MailboxSerializer

    name = serializers.CharField(required=False, allow_blank=True, max_length=200)
    is_catch_all = serializers.BooleanField(required=False)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)
    retention_days = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=3650)
