"""Forms of the web pages: they validate input; services do the work."""

from __future__ import annotations

from django import forms

from tenants.access import Permission
from tenants.models import Domain, Membership


class LoginForm(forms.Form):
    email = forms.EmailField(
        max_length=254, widget=forms.EmailInput(attrs={"autocomplete": "email", "autofocus": True})
    )


class TagsForm(forms.Form):
    tags = forms.CharField(
        max_length=500,
        required=False,
        help_text="Comma-separated",
        widget=forms.TextInput(attrs={"placeholder": "invoices, urgent (comma-separated)"}),
    )

    def tag_list(self) -> list[str]:
        return [tag.strip() for tag in self.cleaned_data["tags"].split(",") if tag.strip()][:20]


class TenantSettingsForm(forms.Form):
    name = forms.CharField(max_length=200)
    ip_allowlist = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="One address or CIDR network per line. Empty: the console and API keys work from anywhere.",
    )

    def cidrs(self) -> list[str]:
        return [line.strip() for line in self.cleaned_data["ip_allowlist"].splitlines() if line.strip()]


class DomainForm(forms.Form):
    name = forms.CharField(max_length=253)
    recipient_policy = forms.ChoiceField(choices=Domain.RecipientPolicy.choices, initial=Domain.RecipientPolicy.REJECT)


class MailboxForm(forms.Form):
    domain = forms.UUIDField()
    local_part = forms.CharField(max_length=64, required=False, help_text="Empty: a random address")
    name = forms.CharField(max_length=200, required=False)
    retention_days = forms.IntegerField(min_value=1, max_value=3650, required=False)


class RetentionForm(forms.Form):
    retention_days = forms.IntegerField(min_value=1, max_value=3650, required=False)


class InviteForm(forms.Form):
    email = forms.EmailField(max_length=254)
    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.MEMBER)


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Membership.Role.choices)


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=200)
    permissions = forms.MultipleChoiceField(
        choices=[(permission.value, permission.value) for permission in Permission],
        widget=forms.CheckboxSelectMultiple,
    )
    domains = forms.MultipleChoiceField(choices=[], required=False, widget=forms.CheckboxSelectMultiple)
    mailboxes = forms.MultipleChoiceField(choices=[], required=False, widget=forms.CheckboxSelectMultiple)
    pools = forms.MultipleChoiceField(choices=[], required=False, widget=forms.CheckboxSelectMultiple)
    expires_in_days = forms.IntegerField(min_value=1, max_value=3650, required=False)
    ip_allowlist = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))

    def __init__(
        self,
        *args: object,
        domains: list[tuple[str, str]],
        mailboxes: list[tuple[str, str]],
        pools: list[tuple[str, str]],
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.fields["domains"].choices = domains  # type: ignore[attr-defined]
        self.fields["mailboxes"].choices = mailboxes  # type: ignore[attr-defined]
        self.fields["pools"].choices = pools  # type: ignore[attr-defined]


class WebhookForm(forms.Form):
    url = forms.URLField(max_length=2000, assume_scheme="https")
    description = forms.CharField(max_length=500, required=False)
    event_types = forms.CharField(
        max_length=1000, required=False, help_text="Comma-separated, e.g. ingest.received, message.*; empty: all"
    )

    def type_list(self) -> list[str]:
        return [name.strip() for name in self.cleaned_data["event_types"].split(",") if name.strip()]


class ReplayForm(forms.Form):
    after = forms.CharField(max_length=200, help_text="An event id (evt_...) to replay everything after")
