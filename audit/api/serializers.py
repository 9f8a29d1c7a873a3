from __future__ import annotations

from typing import Any

from rest_framework import serializers

from audit.models import Event


class EventSerializer(serializers.Serializer[Event]):
    """The contract shape: identical to the webhook body."""

    id = serializers.CharField(source="public_id")
    type = serializers.CharField()
    timestamp = serializers.DateTimeField()
    tenant = serializers.CharField(source="tenant_id")
    trace_id = serializers.CharField()

    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        # A field named "data" cannot be a class attribute: it would hide Serializer.data.
        return {**super().get_fields(), "data": serializers.DictField()}

    def to_representation(self, instance: Event) -> dict[str, Any]:
        return instance.as_json()


class EventPageSerializer(serializers.Serializer[Any]):
    results = EventSerializer(many=True)
    next = serializers.URLField(allow_null=True)
    next_cursor = serializers.CharField(allow_null=True)
