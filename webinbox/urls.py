from django.urls import path

from webinbox.views import console, inbox, outbound, pools, public
from webinbox.views.connectors import connector_action, connectors

app_name = "webinbox"

urlpatterns = [
    path("", public.home, name="home"),
    # Sign-in
    path("login/", public.login_page, name="login"),
    path("login/link/confirm/", public.login_confirm, name="login-confirm"),
    path("login/link/<str:token>/", public.login_link, name="login-link"),
    path("logout/", public.logout_view, name="logout"),
    path("logout/everywhere/", public.logout_everywhere, name="logout-everywhere"),
    # Temporary inboxes: the token in the path is the credential
    path("t/<str:token>/", public.temp_inbox, name="temp-inbox"),
    path("t/<str:token>/poll/", public.temp_poll, name="temp-poll"),
    path("t/<str:token>/extend/", public.temp_extend, name="temp-extend"),
    path("t/<str:token>/delete/", public.temp_delete, name="temp-delete"),
    path("t/<str:token>/m/<str:message_id>/", public.temp_message, name="temp-message"),
    path("t/<str:token>/m/<str:message_id>/body/", public.temp_message_body, name="temp-message-body"),
    # The signed-in inbox
    path("inbox/", inbox.inbox, name="inbox"),
    path("inbox/<slug:tenant_slug>/", inbox.tenant_inbox, name="tenant-inbox"),
    path("inbox/<slug:tenant_slug>/poll/", inbox.poll, name="tenant-poll"),
    path("inbox/<slug:tenant_slug>/mailboxes/<str:mailbox_id>/", inbox.tenant_inbox, name="mailbox"),
    path("inbox/<slug:tenant_slug>/mailboxes/<str:mailbox_id>/poll/", inbox.poll, name="mailbox-poll"),
    path("inbox/<slug:tenant_slug>/m/<str:message_id>/", inbox.message, name="message"),
    path("inbox/<slug:tenant_slug>/m/<str:message_id>/body/", inbox.message_body, name="message-body"),
    path("inbox/<slug:tenant_slug>/m/<str:message_id>/reply/", inbox.message_reply, name="message-reply"),
    path("console/<slug:tenant_slug>/suppressions/", outbound.suppressions, name="console-suppressions"),
    # The tenant console
    path("console/", console.console_home, name="console"),
    path("console/<slug:tenant_slug>/", console.settings_page, name="console-settings"),
    path("console/<slug:tenant_slug>/domains/", console.domains, name="console-domains"),
    path("console/<slug:tenant_slug>/domains/<str:domain_id>/", console.domain_detail, name="console-domain"),
    path("console/<slug:tenant_slug>/mailboxes/", console.mailboxes, name="console-mailboxes"),
    path("console/<slug:tenant_slug>/mailboxes/<str:mailbox_id>/", console.mailbox_action, name="console-mailbox"),
    path("console/<slug:tenant_slug>/members/", console.members, name="console-members"),
    path("console/<slug:tenant_slug>/members/<str:membership_id>/", console.member_action, name="console-member"),
    path("console/<slug:tenant_slug>/keys/", console.api_keys, name="console-keys"),
    path("console/<slug:tenant_slug>/keys/<str:key_id>/revoke/", console.api_key_revoke, name="console-key-revoke"),
    path("console/<slug:tenant_slug>/app-passwords/", console.app_passwords, name="console-app-passwords"),
    path(
        "console/<slug:tenant_slug>/app-passwords/<str:app_password_id>/revoke/",
        console.app_password_revoke,
        name="console-app-password-revoke",
    ),
    path("console/<slug:tenant_slug>/webhooks/", console.webhooks, name="console-webhooks"),
    path("console/<slug:tenant_slug>/webhooks/<str:endpoint_id>/", console.webhook_detail, name="console-webhook"),
    path("console/<slug:tenant_slug>/connectors/", connectors, name="console-connectors"),
    path("console/<slug:tenant_slug>/connectors/<str:connector_id>/", connector_action, name="console-connector"),
    path("console/<slug:tenant_slug>/events/", console.events, name="console-events"),
    path("console/<slug:tenant_slug>/audit/", console.audit_log, name="console-audit"),
    path("console/<slug:tenant_slug>/audit/export/", console.audit_export, name="console-audit-export"),
    path("console/<slug:tenant_slug>/pools/", pools.pools, name="console-pools"),
    path("console/<slug:tenant_slug>/pools/<str:pool_id>/", pools.pool_detail, name="console-pool"),
]
