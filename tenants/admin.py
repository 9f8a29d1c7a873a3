"""Staff views of users, tenants, domains, memberships and API keys.

Status changes and key revocation go through the services (which audit them); every other
write is audited by :class:`audit.admin.StaffAuditedAdmin`. API key hashes are never shown.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import BaseUserCreationForm, SetUnusablePasswordMixin
from django.contrib.auth.forms import UserChangeForm as DjangoUserChangeForm
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone

from audit.admin import StaffAuditedAdmin, staff_actor
from tenants.models import ApiKey, Domain, Membership, SsoDomain, SsoProvider, Tenant, User
from tenants.services import api_key_revoke, domain_name_normalize, tenant_set_status


# --- Users ------------------------------------------------------------------------------
class UserCreationForm(SetUnusablePasswordMixin, BaseUserCreationForm):  # type: ignore[misc]
    """Create a user by e-mail; leaving the password unusable is the default (magic links)."""

    usable_password = SetUnusablePasswordMixin.create_usable_password_field()

    class Meta:
        model = User
        fields = ("email",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["password1"].required = False
        self.fields["password2"].required = False

    def clean_email(self) -> str:
        email = User.objects.normalize_email(self.cleaned_data["email"].strip()).lower()
        if User.objects.filter(email__iexact=email).exists():
            raise forms.ValidationError("A user with this e-mail address already exists.", code="unique")
        return email


class UserChangeForm(DjangoUserChangeForm):  # type: ignore[type-arg]
    class Meta:
        model = User
        fields = "__all__"

    def clean_email(self) -> str:
        email = User.objects.normalize_email(self.cleaned_data["email"].strip()).lower()
        if User.objects.filter(email__iexact=email).exclude(pk=self.instance.pk).exists():
            raise forms.ValidationError("A user with this e-mail address already exists.", code="unique")
        return email


class MembershipInline(admin.TabularInline):  # type: ignore[type-arg]
    """Where a user or tenant belongs, read-only here (memberships are edited on their own page)."""

    model = Membership
    extra = 0
    can_delete = False
    fields = ("tenant", "user", "role", "created_at")
    readonly_fields = fields
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(User)
class UserAdmin(StaffAuditedAdmin, DjangoUserAdmin):  # type: ignore[type-arg]
    audit_resource_type = "user"
    form = UserChangeForm
    add_form = UserCreationForm
    list_display = ("email", "name", "is_active", "is_staff", "is_superuser", "last_login", "date_joined")
    list_filter = ("is_active", "is_staff", "is_superuser", "date_joined")
    search_fields = ("email", "name")
    ordering = ("email",)
    readonly_fields = ("last_login", "date_joined")
    filter_horizontal = ("groups", "user_permissions")
    inlines = (MembershipInline,)
    fieldsets = (
        (None, {"fields": ("email", "name", "password")}),
        ("Access", {"fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions")}),
        ("Dates", {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = ((None, {"classes": ("wide",), "fields": ("email", "usable_password", "password1", "password2")}),)

    def log_change(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        # The password form saves outside save_model; record that it happened (never the value).
        match = request.resolver_match
        if match is not None and match.url_name and match.url_name.endswith("password_change"):
            self.audit_record(request, obj, "password_change", after={"usable_password": obj.has_usable_password()})
        return super().log_change(request, obj, message)

    def get_inlines(self, request: HttpRequest, obj: Any = None) -> Any:
        # Read-only lists of what an existing object holds; nothing to show on "add".
        return self.inlines if obj is not None else ()


# --- Tenants ----------------------------------------------------------------------------
class DomainInline(admin.TabularInline):  # type: ignore[type-arg]
    model = Domain
    extra = 0
    can_delete = False
    fields = ("name", "state", "recipient_policy", "verified_at")
    readonly_fields = fields
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Tenant)
class TenantAdmin(StaffAuditedAdmin):
    audit_resource_type = "tenant"
    list_display = ("name", "slug", "plan", "status", "status_reason", "created_at")
    list_filter = ("status", "plan", "antivirus_mode", "created_at")
    search_fields = ("name", "slug", "=id")
    readonly_fields = ("id", "status", "status_reason", "created_at", "updated_at")
    fields = (
        "id",
        "name",
        "slug",
        "plan",
        "status",
        "status_reason",
        "max_message_size",
        "retention_days",
        "antivirus_mode",
        "ip_allowlist",
        "created_at",
        "updated_at",
    )
    inlines = (DomainInline, MembershipInline)
    actions = ("suspend_tenants", "reactivate_tenants")

    def get_inlines(self, request: HttpRequest, obj: Any = None) -> Any:
        # Read-only lists of what an existing object holds; nothing to show on "add".
        return self.inlines if obj is not None else ()

    @admin.action(description="Suspend selected tenants", permissions=["change"])
    def suspend_tenants(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        actor = staff_actor(request)
        changed = 0
        for tenant in queryset.filter(status=Tenant.Status.ACTIVE):
            tenant_set_status(
                tenant=tenant, status=Tenant.Status.SUSPENDED, actor=actor, reason=f"suspended by {actor.label}"
            )
            changed += 1
        self.message_user(request, f"Suspended {changed} tenant(s).", messages.SUCCESS)

    @admin.action(description="Reactivate selected tenants", permissions=["change"])
    def reactivate_tenants(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        actor = staff_actor(request)
        changed = 0
        for tenant in queryset.filter(status=Tenant.Status.SUSPENDED):
            tenant_set_status(tenant=tenant, status=Tenant.Status.ACTIVE, actor=actor)
            changed += 1
        self.message_user(request, f"Reactivated {changed} tenant(s).", messages.SUCCESS)


# --- Domains ----------------------------------------------------------------------------
class DomainForm(forms.ModelForm):  # type: ignore[type-arg]
    class Meta:
        model = Domain
        fields = ("tenant", "name", "recipient_policy", "antivirus_mode")

    def clean_name(self) -> str:
        # The same normalization as the API, so the admin cannot store "Example.COM.".
        return domain_name_normalize(self.cleaned_data["name"])


@admin.register(Domain)
class DomainAdmin(StaffAuditedAdmin):
    audit_resource_type = "domain"
    form = DomainForm
    list_display = (
        "name",
        "tenant",
        "state",
        "platform_managed",
        "recipient_policy",
        "verified_at",
        "last_checked_at",
        "failed_checks",
        "created_at",
    )
    list_filter = ("state", "platform_managed", "recipient_policy", "antivirus_mode", "tenant__plan", "created_at")
    list_select_related = ("tenant",)
    search_fields = ("name", "tenant__name", "tenant__slug", "=id")
    autocomplete_fields = ("tenant",)
    readonly_fields = (
        "id",
        "state",
        "state_reason",
        "verification_token",
        "verified_at",
        "last_checked_at",
        "mx_lost_at",
        "suspended_at",
        "failed_checks",
        "failing_since",
        "created_at",
        "updated_at",
    )

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        # A domain's name and owner are its identity: fixed once it exists.
        fields = tuple(super().get_readonly_fields(request, obj))
        return ("tenant", "name", *fields) if obj is not None else fields


# --- Memberships ------------------------------------------------------------------------
@admin.register(Membership)
class MembershipAdmin(StaffAuditedAdmin):
    audit_resource_type = "membership"
    list_display = ("user", "tenant", "role", "created_at")
    list_filter = ("role", "tenant__plan", "created_at")
    list_select_related = ("user", "tenant")
    search_fields = ("user__email", "user__name", "tenant__name", "tenant__slug")
    autocomplete_fields = ("user", "tenant")
    readonly_fields = ("created_at",)


# --- API keys ---------------------------------------------------------------------------
class ApiKeyStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "Active"), ("revoked", "Revoked"), ("expired", "Expired")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        now = timezone.now()
        if self.value() == "active":
            return queryset.filter(revoked_at__isnull=True).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        if self.value() == "expired":
            return queryset.filter(revoked_at__isnull=True, expires_at__lte=now)
        return queryset


@admin.register(ApiKey)
class ApiKeyAdmin(StaffAuditedAdmin):
    """Keys are minted through the API or console (the secret is shown once, there).

    Staff may rename, change the expiry, revoke and delete. The hash is never on any page.
    """

    audit_resource_type = "api_key"
    list_display = ("name", "masked", "tenant", "state", "created_at", "expires_at", "last_used_at", "revoked_at")
    list_filter = (ApiKeyStateFilter, "tenant__plan", "created_at")
    list_select_related = ("tenant",)
    search_fields = ("name", "last_four", "tenant__name", "tenant__slug", "=id")
    exclude = ("secret_hash", "prefix")
    fields = (
        "id",
        "name",
        "masked",
        "tenant",
        "permissions",
        "allowed_domains",
        "allowed_mailboxes",
        "expires_at",
        "ip_allowlist",
        "revoked_at",
        "last_used_at",
        "last_used_ip",
        "created_by",
        "created_at",
    )
    readonly_fields = (
        "id",
        "masked",
        "tenant",
        "permissions",
        "allowed_domains",
        "allowed_mailboxes",
        "revoked_at",
        "last_used_at",
        "last_used_ip",
        "created_by",
        "created_at",
    )
    actions = ("revoke_keys",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="key")
    def masked(self, obj: ApiKey) -> str:
        return f"mp_…{obj.last_four}"

    @admin.display(description="state")
    def state(self, obj: ApiKey) -> str:
        if obj.is_revoked:
            return "revoked"
        return "expired" if obj.is_expired else "active"

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        actor = staff_actor(request)
        revoked = 0
        for api_key in queryset.filter(revoked_at__isnull=True):
            api_key_revoke(principal=None, api_key=api_key, actor=actor)
            revoked += 1
        self.message_user(request, f"Revoked {revoked} key(s).", messages.SUCCESS)


# --- SSO --------------------------------------------------------------------------------
class SsoDomainInline(admin.TabularInline):  # type: ignore[type-arg]
    model = SsoDomain
    extra = 0
    can_delete = False
    fields = ("name",)
    readonly_fields = fields
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(SsoProvider)
class SsoProviderAdmin(StaffAuditedAdmin):
    """A tenant's OIDC provider. Configured by the tenant (the client secret is encrypted
    there and never shown); staff may switch it off, relax ``require_sso`` or fix roles."""

    audit_resource_type = "sso_provider"
    list_display = ("tenant", "issuer", "client_id", "enabled", "require_sso", "default_role", "updated_at")
    list_filter = ("enabled", "require_sso", "default_role")
    list_select_related = ("tenant",)
    search_fields = ("tenant__name", "tenant__slug", "issuer", "client_id", "domains__name")
    fields = (
        "id",
        "tenant",
        "issuer",
        "client_id",
        "scopes",
        "enabled",
        "require_sso",
        "default_role",
        "role_claim",
        "role_mapping",
        "discovery_fetched_at",
        "created_at",
        "updated_at",
    )
    readonly_fields = ("id", "tenant", "issuer", "client_id", "discovery_fetched_at", "created_at", "updated_at")
    inlines = (SsoDomainInline,)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(SsoDomain)
class SsoDomainAdmin(StaffAuditedAdmin):
    audit_resource_type = "sso_domain"
    list_display = ("name", "provider")
    list_select_related = ("provider__tenant",)
    search_fields = ("name", "provider__tenant__name", "provider__tenant__slug", "provider__issuer")
    autocomplete_fields = ("provider",)

    def audit_tenant_id(self, obj: Any) -> Any:
        return obj.provider.tenant_id
