"""Serializers of the connectors API: no field ever carries a secret out."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from ingest.imap.oauth import PRESETS
from ingest.models import Connector, ConnectorFolder
from mailplatform.api import StrictSerializer


class ConnectorFolderSerializer(serializers.ModelSerializer[ConnectorFolder]):
    class Meta:
        model = ConnectorFolder
        fields = ["name", "uid_validity", "last_uid", "updated_at"]
        read_only_fields = fields


class ConnectorSerializer(serializers.ModelSerializer[Connector]):
    """A connector as shown: whether secrets are set, never their values."""

    mailbox_address = serializers.CharField(source="mailbox.address", read_only=True)
    folders = serializers.ListField(child=serializers.CharField())
    has_password = serializers.SerializerMethodField()
    oauth_connected = serializers.SerializerMethodField()
    leased = serializers.SerializerMethodField()

    class Meta:
        model = Connector
        fields = [
            "id",
            "name",
            "mailbox",
            "mailbox_address",
            "host",
            "port",
            "tls_mode",
            "auth_type",
            "username",
            "has_password",
            "oauth_provider",
            "oauth_client_id",
            "oauth_authorize_url",
            "oauth_token_url",
            "oauth_scope",
            "oauth_connected",
            "folders",
            "active",
            "state",
            "last_error",
            "last_error_kind",
            "last_error_at",
            "last_connected_at",
            "last_fetched_at",
            "leased",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    def get_has_password(self, connector: Connector) -> bool:
        return bool(connector.password_encrypted)

    def get_oauth_connected(self, connector: Connector) -> bool:
        return bool(connector.oauth_refresh_token_encrypted)

    def get_leased(self, connector: Connector) -> bool:
        from django.utils import timezone

        return bool(
            connector.lease_owner and connector.lease_expires_at and connector.lease_expires_at > timezone.now()
        )


class ConnectorDetailSerializer(ConnectorSerializer):
    folder_cursors = ConnectorFolderSerializer(many=True, read_only=True)

    class Meta(ConnectorSerializer.Meta):
        fields = [*ConnectorSerializer.Meta.fields, "folder_cursors"]
        read_only_fields = fields


class ConnectorUpdateSerializer(StrictSerializer):
    output_serializer_class = ConnectorSerializer

    name = serializers.CharField(required=False, allow_blank=True, max_length=200)
    mailbox = serializers.UUIDField(required=False, help_text="The mailbox mail is pulled into")
    host = serializers.CharField(required=False, max_length=253)
    port = serializers.IntegerField(required=False, min_value=1, max_value=65535)
    tls_mode = serializers.ChoiceField(choices=Connector.TlsMode.choices, required=False)
    auth_type = serializers.ChoiceField(choices=Connector.AuthType.choices, required=False)
    username = serializers.CharField(required=False, max_length=320)
    password = serializers.CharField(
        required=False, allow_blank=True, max_length=1000, write_only=True, help_text="Stored encrypted, never shown"
    )
    folders = serializers.ListField(
        child=serializers.CharField(max_length=500), required=False, max_length=20, help_text="Default: INBOX"
    )
    active = serializers.BooleanField(required=False)
    oauth_provider = serializers.ChoiceField(
        choices=[("", "custom"), *((name, name) for name in PRESETS)], required=False
    )
    oauth_client_id = serializers.CharField(required=False, allow_blank=True, max_length=500)
    oauth_client_secret = serializers.CharField(required=False, allow_blank=True, max_length=1000, write_only=True)
    oauth_authorize_url = serializers.URLField(required=False, allow_blank=True, max_length=2000)
    oauth_token_url = serializers.URLField(required=False, allow_blank=True, max_length=2000)
    oauth_scope = serializers.CharField(required=False, allow_blank=True, max_length=1000)
    oauth_refresh_token = serializers.CharField(
        required=False, allow_blank=True, max_length=4000, write_only=True,
        help_text="A refresh token obtained elsewhere (otherwise use oauth/initiate)",
    )  # fmt: skip


class ConnectorCreateSerializer(ConnectorUpdateSerializer):
    mailbox = serializers.UUIDField(help_text="The mailbox mail is pulled into")
    host = serializers.CharField(max_length=253)
    username = serializers.CharField(max_length=320)


class ConnectorTestSerializer(serializers.Serializer[Any]):
    ok = serializers.BooleanField()
    stage = serializers.ChoiceField(choices=["resolve", "connect", "tls", "login", "list", "done"])
    folders = serializers.ListField(child=serializers.CharField())
    capabilities = serializers.ListField(child=serializers.CharField())
    error_kind = serializers.CharField(allow_blank=True)
    error = serializers.CharField(allow_blank=True)


class OAuthInitiateSerializer(StrictSerializer):
    connector = serializers.UUIDField(help_text="The connector whose account is being connected")


class OAuthInitiatedSerializer(serializers.Serializer[Any]):
    authorize_url = serializers.CharField()
    redirect_uri = serializers.CharField()
    expires_in = serializers.IntegerField()
