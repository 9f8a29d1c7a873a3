"""Shapes of pools, bindings and providers in the API."""

from __future__ import annotations

import json
import re
from typing import Any
from uuid import UUID

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from mailboxes.bindings import selectors
from mailboxes.models import AccountBinding, AccountProvider, MailboxPool
from mailplatform.api import StrictSerializer

METADATA_MAX_BYTES = 4096


class PoolMetricsSerializer(serializers.Serializer[Any]):
    mailboxes = serializers.IntegerField()
    bound_mailboxes = serializers.IntegerField(help_text="Mailboxes with at least one active binding")
    free_mailboxes = serializers.IntegerField(help_text="Mailboxes that can take another account")
    accounts = serializers.IntegerField(help_text="Active bindings")
    free_places = serializers.IntegerField(help_text="Accounts the pool can still take (ignoring providers)")
    bindings_per_mailbox = serializers.DictField(
        child=serializers.IntegerField(), help_text="Active bindings per mailbox -> number of mailboxes"
    )
    accounts_per_provider = serializers.DictField(child=serializers.IntegerField())
    codes_served_24h = serializers.IntegerField()
    messages_received_24h = serializers.IntegerField()


class PoolSerializer(serializers.ModelSerializer[MailboxPool]):
    domain_name = serializers.CharField(source="domain.name", read_only=True)
    metrics = serializers.SerializerMethodField()

    class Meta:
        model = MailboxPool
        fields = [
            "id",
            "name",
            "domain",
            "domain_name",
            "policy",
            "max_bindings_per_mailbox",
            "one_per_provider",
            "auto_provision",
            "provision_threshold",
            "provision_batch",
            "max_mailboxes",
            "metrics",
            "created_at",
        ]
        read_only_fields = fields

    @extend_schema_field(PoolMetricsSerializer)
    def get_metrics(self, pool: MailboxPool) -> dict[str, Any]:
        return selectors.pool_metrics(pool)


class _PoolSettings(StrictSerializer):
    output_serializer_class = PoolSerializer

    name = serializers.CharField(max_length=100)
    policy = serializers.ChoiceField(choices=MailboxPool.Policy.choices, required=False)
    max_bindings_per_mailbox = serializers.IntegerField(min_value=1, max_value=10_000, required=False)
    one_per_provider = serializers.BooleanField(required=False)
    auto_provision = serializers.BooleanField(required=False)
    provision_threshold = serializers.IntegerField(min_value=0, max_value=100_000, required=False)
    provision_batch = serializers.IntegerField(min_value=1, max_value=1000, required=False)
    max_mailboxes = serializers.IntegerField(min_value=1, max_value=100_000, required=False)


class PoolCreateSerializer(_PoolSettings):
    domain = serializers.UUIDField(help_text="One of your domains")
    size = serializers.IntegerField(
        min_value=0, max_value=1000, required=False, default=0, help_text="New mailboxes with random addresses"
    )
    mailboxes = serializers.ListField(
        child=serializers.UUIDField(), required=False, default=list, max_length=1000, help_text="Existing mailboxes"
    )


class PoolUpdateSerializer(_PoolSettings):
    name = serializers.CharField(max_length=100, required=False)


class BindingSerializer(serializers.ModelSerializer[AccountBinding]):
    address = serializers.CharField(source="mailbox.address", read_only=True, help_text="The account's e-mail address")
    ended_reason = serializers.CharField(read_only=True, help_text="released or reassigned; empty while active")

    class Meta:
        model = AccountBinding
        fields = [
            "id",
            "account_ref",
            "provider",
            "pool",
            "mailbox",
            "address",
            "label",
            "metadata",
            "active",
            "created_at",
            "released_at",
            "ended_reason",
            "successor",
        ]
        read_only_fields = fields


class LinkOrCreateResultSerializer(BindingSerializer):
    created = serializers.SerializerMethodField()
    link = serializers.SerializerMethodField(
        help_text="The account's link (mpl_...): only in the answer that created the binding; store it"
    )

    class Meta(BindingSerializer.Meta):
        fields = [*BindingSerializer.Meta.fields, "created", "link"]
        read_only_fields = fields

    def get_created(self, binding: AccountBinding) -> bool:
        return bool(self.context["created"])

    def get_link(self, binding: AccountBinding) -> str | None:
        link = self.context.get("link")
        return str(link) if link else None


def _metadata_bounded(value: Any) -> Any:
    if len(json.dumps(value)) > METADATA_MAX_BYTES:
        raise serializers.ValidationError(f"At most {METADATA_MAX_BYTES} bytes of JSON.")
    return value


PROVIDER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$"
ACCOUNT_REF_MAX = 200


class LinkOrCreateSerializer(StrictSerializer):
    output_serializer_class = BindingSerializer

    account_ref = serializers.CharField(max_length=ACCOUNT_REF_MAX, help_text="Your own opaque id of the account")
    provider = serializers.RegexField(PROVIDER_PATTERN, max_length=40, help_text="google, github, openai...")
    pool = serializers.UUIDField()
    label = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")  # type: ignore[assignment]
    metadata = serializers.DictField(required=False, default=dict, validators=[_metadata_bounded])


class ReassignSerializer(StrictSerializer):
    output_serializer_class = BindingSerializer
    schema_constraints = {"not": {"required": ["mailbox", "pool"]}}

    mailbox = serializers.UUIDField(required=False, help_text="A mailbox of a pool (omit to allocate one)")
    pool = serializers.UUIDField(required=False, help_text="Allocate from this pool (default: the binding's)")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "mailbox" in attrs and "pool" in attrs:
            raise serializers.ValidationError("Give a mailbox, or a pool, not both.")
        return attrs


class ProviderSerializer(serializers.ModelSerializer[AccountProvider]):
    class Meta:
        model = AccountProvider
        fields = ["id", "name", "sender_domains", "subject_patterns", "created_at", "updated_at"]
        read_only_fields = fields


class ProviderUpdateSerializer(StrictSerializer):
    output_serializer_class = ProviderSerializer

    sender_domains = serializers.ListField(
        child=serializers.CharField(max_length=253), max_length=50, required=False, help_text="accounts.google.com..."
    )
    subject_patterns = serializers.ListField(
        child=serializers.CharField(max_length=200),
        max_length=50,
        required=False,
        help_text="Case-insensitive regular expressions",
    )


class ProviderCreateSerializer(ProviderUpdateSerializer):
    name = serializers.RegexField(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$", max_length=40)


# --- link-or-create's common case, without building serializer fields ---------------------
# A host calls link-or-create on every sign-in, so its plain shape is read and answered by
# hand: exactly what the serializers above give (mailboxes/tests/test_bindings_plain.py holds them
# to it), and anything else goes to the serializers, which also word the errors.
_PROVIDER = re.compile(PROVIDER_PATTERN)
_PLAIN_KEYS = frozenset({"account_ref", "provider", "pool", "label"})
_TIMESTAMP = serializers.DateTimeField()


def link_or_create_plain(data: Any) -> dict[str, Any] | None:
    """The validated body of a plain link-or-create call (ASCII strings, no metadata), as
    :class:`LinkOrCreateSerializer` would validate it; None for any other body."""
    if not isinstance(data, dict) or not data.keys() <= _PLAIN_KEYS:
        return None
    if data.get("label", "") is None:
        return None
    texts = [data.get(key) for key in ("account_ref", "provider", "pool")] + [data.get("label", "")]
    if not all(isinstance(value, str) and value.isascii() and "\x00" not in value for value in texts):
        return None
    account_ref, provider, pool, label = (str(value) for value in texts)
    account_ref, provider, label = account_ref.strip(), provider.strip(), label.strip()
    if not 0 < len(account_ref) <= ACCOUNT_REF_MAX or len(label) > ACCOUNT_REF_MAX or not _PROVIDER.match(provider):
        return None
    try:
        pool_id = UUID(hex=pool)
    except ValueError:
        return None
    return {"account_ref": account_ref, "provider": provider, "pool": pool_id, "label": label, "metadata": {}}


def binding_representation(binding: AccountBinding, *, created: bool, link: str | None) -> dict[str, Any]:
    """What :class:`LinkOrCreateResultSerializer` shows of ``binding`` (its mailbox loaded)."""
    return {
        "id": str(binding.pk),
        "account_ref": binding.account_ref,
        "provider": binding.provider,
        "pool": str(binding.pool_id),
        "mailbox": str(binding.mailbox_id),
        "address": binding.mailbox.address,
        "label": binding.label,
        "metadata": binding.metadata,
        "active": binding.active,
        "created_at": _TIMESTAMP.to_representation(binding.created_at),
        "released_at": _TIMESTAMP.to_representation(binding.released_at) if binding.released_at else None,
        "ended_reason": binding.ended_reason,
        "successor": str(binding.successor_id) if binding.successor_id else None,
        "created": created,
        "link": str(link) if link else None,
    }
