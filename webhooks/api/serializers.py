from __future__ import annotations

from typing import Any

from rest_framework import serializers

from mailplatform.api import StrictSerializer
from webhooks.models import Attempt, Delivery, Endpoint


class EndpointSerializer(serializers.ModelSerializer[Endpoint]):
    """An endpoint as shown after creation: never its secrets."""

    domains = serializers.ListField(source="domain_ids", child=serializers.UUIDField())
    mailboxes = serializers.ListField(source="mailbox_ids", child=serializers.UUIDField())
    event_types = serializers.ListField(child=serializers.CharField())

    class Meta:
        model = Endpoint
        fields = [
            "id",
            "url",
            "description",
            "event_types",
            "domains",
            "mailboxes",
            "enabled",
            "disabled_reason",
            "disabled_at",
            "failing_since",
            "secret_rotated_at",
            "previous_secret_expires_at",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class EndpointCreatedSerializer(EndpointSerializer):
    """Returned once, on creation or rotation: includes the signing secret."""

    secret = serializers.SerializerMethodField()

    class Meta(EndpointSerializer.Meta):
        fields = [*EndpointSerializer.Meta.fields, "secret"]
        read_only_fields = fields

    def get_secret(self, endpoint: Endpoint) -> str:
        return str(self.context["secret"])


class EndpointCreateSerializer(StrictSerializer):
    output_serializer_class = EndpointSerializer

    url = serializers.CharField(max_length=2000)
    description = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")
    event_types = serializers.ListField(
        child=serializers.CharField(max_length=64), required=False, default=list, max_length=50
    )
    domains = serializers.ListField(child=serializers.UUIDField(), required=False, default=list, max_length=200)
    mailboxes = serializers.ListField(child=serializers.UUIDField(), required=False, default=list, max_length=200)


class EndpointUpdateSerializer(EndpointCreateSerializer):
    enabled = serializers.BooleanField(required=False)


class RotateSecretSerializer(StrictSerializer):
    overlap_seconds = serializers.IntegerField(min_value=0, max_value=7 * 24 * 3600, required=False)


class ReplaySerializer(StrictSerializer):
    # validate() needs one of the two (an empty "after" counts as none).
    schema_constraints = {"anyOf": [{"required": ["after"]}, {"required": ["since"]}]}

    after = serializers.CharField(max_length=200, required=False, help_text="An event id (evt_...) or cursor")
    since = serializers.DateTimeField(required=False)
    until = serializers.DateTimeField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if not attrs.get("after") and not attrs.get("since"):
            raise serializers.ValidationError("Give 'after' (an event id or cursor) or 'since'.")
        if attrs.get("since") and attrs.get("until") and attrs["until"] <= attrs["since"]:
            raise serializers.ValidationError({"until": ["Must be after 'since'."]})
        return attrs


class ReplayResultSerializer(serializers.Serializer[Any]):
    enqueued = serializers.IntegerField()
    first_event = serializers.CharField(allow_null=True)
    last_event = serializers.CharField(allow_null=True)
    truncated = serializers.BooleanField()
    next_cursor = serializers.CharField(allow_null=True)


class AttemptSerializer(serializers.ModelSerializer[Attempt]):
    class Meta:
        model = Attempt
        fields = ["number", "started_at", "duration_ms", "status_code", "succeeded", "error", "response_body"]
        read_only_fields = fields


class DeliverySerializer(serializers.ModelSerializer[Delivery]):
    event = serializers.CharField(source="event.public_id")
    event_type = serializers.CharField(source="event.type")
    endpoint = serializers.UUIDField(source="endpoint_id")

    class Meta:
        model = Delivery
        fields = [
            "id",
            "endpoint",
            "event",
            "event_type",
            "state",
            "origin",
            "attempts",
            "next_attempt_at",
            "last_status",
            "last_error",
            "delivered_at",
            "created_at",
        ]
        read_only_fields = fields


class DeliveryDetailSerializer(DeliverySerializer):
    attempt_log = AttemptSerializer(many=True)

    class Meta(DeliverySerializer.Meta):
        fields = [*DeliverySerializer.Meta.fields, "attempt_log"]
        read_only_fields = fields
