"""Shapes of messages in the API; bodies only in the detail, never in lists."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from mailboxes import blobs
from mailboxes.api.authentication_serializers import AuthenticationSerializer, authentication_of
from mailboxes.models import Attachment, Message
from mailboxes.sanitize import html_render
from mailplatform.api import StrictSerializer

MAX_TAGS = 20


def download_of(key: str, *, filename: str, content_type: str, size: int, sha256: str) -> dict[str, Any]:
    """A signed download: the URL, when it stops working, and what it will return."""
    return {
        "url": blobs.blob_signed_url(key, filename=filename, content_type=content_type),
        "expires_at": timezone.now() + timedelta(seconds=settings.SIGNED_URL_TTL),
        "filename": filename,
        "content_type": content_type,
        "size": size,
        "sha256": sha256,
    }


class DownloadSerializer(serializers.Serializer[Any]):
    url = serializers.URLField()
    expires_at = serializers.DateTimeField()
    filename = serializers.CharField()
    content_type = serializers.CharField()
    size = serializers.IntegerField()
    sha256 = serializers.CharField()


class AddressSerializer(serializers.Serializer[Any]):
    name = serializers.CharField()
    address = serializers.CharField()


class LinkSerializer(serializers.Serializer[Any]):
    url = serializers.CharField()
    text = serializers.CharField()


class AttachmentSerializer(serializers.ModelSerializer[Attachment]):
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = Attachment
        fields = ["id", "filename", "content_type", "size", "sha256", "content_id", "is_inline", "download_url"]
        read_only_fields = fields

    def get_download_url(self, attachment: Attachment) -> str:
        return blobs.blob_signed_url(
            attachment.storage_key,
            filename=attachment.filename,
            content_type=attachment.content_type,
            inline=attachment.is_inline,
        )


class MessageSummarySerializer(serializers.ModelSerializer[Message]):
    from_ = AddressSerializer(source="from_entry", read_only=True)

    class Meta:
        model = Message
        fields = [
            "id",
            "mailbox",
            "state",
            "received_at",
            "subject",
            "from_",
            "to",
            "date",
            "thread_id",
            "tags",
            "is_read",
            "is_sent",
            "has_attachments",
            "codes",
            "size",
        ]
        read_only_fields = fields

    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        # "from" is a Python keyword, so the field is declared as from_ and named here,
        # where the API (and the schema) call it.
        return {("from" if name == "from_" else name): field for name, field in super().get_fields().items()}


class AntivirusSerializer(serializers.Serializer[Any]):
    """The antivirus scan (clamd) of a message."""

    verdict = serializers.ChoiceField(
        choices=["not_scanned", "clean", "infected", "error", "too_large"],
        help_text="not_scanned: scanning off for it (or not yet); error: clamd was unavailable, a rescan is due;"
        " too_large: over the scanner's limit, not scanned",
    )
    signature = serializers.CharField(help_text="What clamd found (infected only), e.g. Win.Test.EICAR_HDB-1")
    scanned_at = serializers.DateTimeField(allow_null=True)


def antivirus_of(message: Message) -> dict[str, Any]:
    return {
        "verdict": message.antivirus_verdict or "not_scanned",
        "signature": message.antivirus_signature,
        "scanned_at": message.antivirus_scanned_at,
    }


class MessageDetailSerializer(MessageSummarySerializer):
    attachments = AttachmentSerializer(many=True, read_only=True)
    antivirus = serializers.SerializerMethodField()
    authentication = serializers.SerializerMethodField()
    html = serializers.SerializerMethodField()
    cc = AddressSerializer(many=True, read_only=True)
    reply_to = AddressSerializer(many=True, read_only=True)
    links = LinkSerializer(many=True, read_only=True)
    headers = serializers.ListField(child=serializers.ListField(child=serializers.CharField()), read_only=True)

    class Meta(MessageSummarySerializer.Meta):
        fields = [
            *MessageSummarySerializer.Meta.fields,
            "state_reason",
            "source",
            "mail_from",
            "rcpt",
            "cc",
            "reply_to",
            "sender",
            "message_id",
            "in_reply_to",
            "references",
            "headers",
            "text",
            "html",
            "stripped_text",
            "links",
            "authentication_results",
            "received_spf",
            "antivirus",
            "authentication",
            "attachments",
            "sha256",
            "trace_id",
            "parsed_at",
            "indexed_at",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "authentication_results": {
                "help_text": "Our own Authentication-Results value (RFC 8601), never the sender's; with"
                " verification off, the sender's fields that do not claim our authserv-id"
            }
        }

    @extend_schema_field(AuthenticationSerializer(allow_null=True))
    def get_authentication(self, message: Message) -> dict[str, Any] | None:
        """SPF, DKIM, DMARC and ARC as we verified them; null before verification."""
        return authentication_of(message)

    @extend_schema_field(AntivirusSerializer)
    def get_antivirus(self, message: Message) -> dict[str, Any]:
        return antivirus_of(message)

    def get_html(self, message: Message) -> str:
        if not message.html:
            return ""
        by_cid = {a.content_id: a for a in message.attachments.all() if a.content_id}

        def cid_url(content_id: str) -> str | None:
            attachment = by_cid.get(content_id)
            if attachment is None:
                return None
            return blobs.blob_signed_url(
                attachment.storage_key, filename=attachment.filename, content_type=attachment.content_type, inline=True
            )

        return html_render(message.html, cid_url=cid_url, remote_images=bool(self.context.get("remote_images")))


class MessageUpdateSerializer(StrictSerializer):
    output_serializer_class = MessageDetailSerializer

    is_read = serializers.BooleanField(required=False)
    tags = serializers.ListField(
        child=serializers.RegexField(r"^[\w.:-]{1,64}$", max_length=64),
        required=False,
        max_length=MAX_TAGS,
        help_text="Replaces the message's tags (letters, digits, . _ : -)",
    )
