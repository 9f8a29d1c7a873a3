from __future__ import annotations

from typing import Any

from rest_framework import serializers
from rest_framework.validators import ProhibitSurrogateCharactersValidator

from mailplatform.api import StrictSerializer
from outbound.models import DkimKey, OutboundMessage, Recipient, Suppression


class DkimKeySerializer(serializers.ModelSerializer[DkimKey]):
    record_name = serializers.CharField(read_only=True, help_text="Where to publish the TXT record")
    record_value = serializers.CharField(read_only=True, help_text="The TXT record's value")
    domain = serializers.CharField(source="domain.name", read_only=True)

    class Meta:
        model = DkimKey
        fields = [
            "id",
            "domain",
            "selector",
            "algorithm",
            "state",
            "record_name",
            "record_value",
            "published",
            "last_checked_at",
            "last_check_error",
            "activated_at",
            "retired_at",
            "created_at",
        ]
        read_only_fields = fields


class DkimKeyCreateSerializer(StrictSerializer):
    algorithm = serializers.ChoiceField(choices=DkimKey.Algorithm.choices, default=DkimKey.Algorithm.RSA)
    selector = serializers.CharField(required=False, allow_blank=True, max_length=63)


class DkimKeyVerifySerializer(DkimKeySerializer):
    check = serializers.SerializerMethodField()

    class Meta(DkimKeySerializer.Meta):
        fields = [*DkimKeySerializer.Meta.fields, "check"]
        read_only_fields = fields

    def get_check(self, key: DkimKey) -> dict[str, Any]:
        return dict(self.context.get("check", {}))


class AttachmentSerializer(StrictSerializer):
    filename = serializers.CharField(max_length=255)
    content_type = serializers.RegexField(
        r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$",
        required=False,
        default="application/octet-stream",
        help_text="type/subtype (RFC 6838)",
    )
    content = serializers.CharField(help_text="base64")


class BodyField(serializers.CharField):
    """A message body: DRF's surrogate check, done by the UTF-8 codec (one C call instead of a
    Python loop over every character of a body that may be megabytes long)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.validators = [
            validator
            for validator in self.validators
            if not isinstance(validator, ProhibitSurrogateCharactersValidator)
        ]

    def to_internal_value(self, data: Any) -> str:
        value = super().to_internal_value(data)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise serializers.ValidationError(
                f"Surrogate characters are not allowed: U+{ord(value[exc.start]):X}.",
                code="surrogate_characters_not_allowed",
            ) from None
        return value


class SendSerializer(StrictSerializer):
    from_ = serializers.CharField(max_length=320, help_text="A mailbox address on a verified domain")
    to = serializers.ListField(
        child=serializers.CharField(max_length=320), required=False, default=list, max_length=100
    )
    cc = serializers.ListField(
        child=serializers.CharField(max_length=320), required=False, default=list, max_length=100
    )
    bcc = serializers.ListField(
        child=serializers.CharField(max_length=320), required=False, default=list, max_length=100
    )
    reply_to = serializers.ListField(
        child=serializers.CharField(max_length=320), required=False, default=list, max_length=10
    )
    subject = serializers.CharField(max_length=998, required=False, default="", allow_blank=True)
    text = BodyField(required=False, default="", allow_blank=True, trim_whitespace=False)
    html = BodyField(required=False, default="", allow_blank=True, trim_whitespace=False)
    headers = serializers.DictField(child=serializers.CharField(max_length=998), required=False, default=dict)
    attachments = AttachmentSerializer(many=True, required=False, default=list)
    reply_to_message = serializers.UUIDField(
        required=False,
        allow_null=True,
        default=None,
        help_text="A stored message to answer: threads with In-Reply-To/References",
    )

    def get_fields(self) -> dict[str, Any]:
        fields = super().get_fields()
        fields["from"] = fields.pop("from_")
        return fields


class RecipientSerializer(serializers.ModelSerializer[Recipient]):
    class Meta:
        model = Recipient
        fields = [
            "id",
            "address",
            "state",
            "attempts",
            "next_attempt_at",
            "last_attempt_at",
            "last_response",
            "remote_host",
            "delivered_at",
            "bounced_at",
            "dkim_selector",
        ]
        read_only_fields = fields


class OutboundMessageSerializer(serializers.ModelSerializer[OutboundMessage]):
    recipients = RecipientSerializer(many=True, read_only=True)
    sent_message = serializers.UUIDField(source="sent_message_id", read_only=True, allow_null=True)
    mailbox = serializers.UUIDField(source="mailbox_id", read_only=True, allow_null=True)
    status = serializers.SerializerMethodField()

    class Meta:
        model = OutboundMessage
        fields = [
            "id",
            "status",
            "source",
            "from_address",
            "subject",
            "message_id",
            "size",
            "mailbox",
            "sent_message",
            "created_at",
            "recipients",
        ]
        read_only_fields = fields

    def get_status(self, message: OutboundMessage) -> str:
        """``queued`` while any recipient is pending, otherwise ``done``."""
        states = {recipient.state for recipient in message.recipients.all()}
        return "queued" if states & set(Recipient.PENDING_STATES) else "done"


class SuppressionSerializer(serializers.ModelSerializer[Suppression]):
    class Meta:
        model = Suppression
        fields = ["id", "address", "reason", "detail", "created_at"]
        read_only_fields = fields


class SuppressionCreateSerializer(StrictSerializer):
    address = serializers.CharField(max_length=320)
    detail = serializers.CharField(max_length=1000, required=False, default="", allow_blank=True)


class DomainSendingSerializer(StrictSerializer):
    any_local_part = serializers.BooleanField(
        help_text="Any address of the domain may be the From (a key holding the whole domain), not only its mailboxes"
    )


_DATETIME = serializers.DateTimeField()


def _datetime(value: Any) -> str | None:
    return None if value is None else _DATETIME.to_representation(value)


def outbound_message_body(message: OutboundMessage, recipients: list[Recipient]) -> dict[str, Any]:
    """What :class:`OutboundMessageSerializer` gives for a message just queued, built without
    constructing the serializer (its fields, and each recipient's, are made anew for every
    instance: more CPU than the rest of the 202). A test holds the two equal."""
    rows = sorted(recipients, key=lambda recipient: recipient.address)
    pending = set(Recipient.PENDING_STATES)
    return {
        "id": str(message.pk),
        "status": "queued" if any(row.state in pending for row in rows) else "done",
        "source": str(message.source),
        "from_address": message.from_address,
        "subject": message.subject,
        "message_id": message.message_id,
        "size": int(message.size),
        "mailbox": None if message.mailbox_id is None else str(message.mailbox_id),
        "sent_message": None if message.sent_message_id is None else str(message.sent_message_id),
        "created_at": _datetime(message.created_at),
        "recipients": [
            {
                "id": str(row.pk),
                "address": row.address,
                "state": str(row.state),
                "attempts": int(row.attempts),
                "next_attempt_at": _datetime(row.next_attempt_at),
                "last_attempt_at": _datetime(row.last_attempt_at),
                "last_response": row.last_response,
                "remote_host": row.remote_host,
                "delivered_at": _datetime(row.delivered_at),
                "bounced_at": _datetime(row.bounced_at),
                "dkim_selector": row.dkim_selector,
            }
            for row in rows
        ],
    }
