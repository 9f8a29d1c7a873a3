from django.urls import path
from rest_framework.routers import SimpleRouter

from ingest.api.views import MessageUploadView
from mailboxes.api import views
from mailboxes.api.binding_codes import AccountCodeLatestView, LinkCodeLatestView
from mailboxes.api.bindings import BindingViewSet, LinkDetailView, LinkOrCreateView, PoolViewSet, ProviderViewSet
from mailboxes.api.messages import AttachmentDownloadView, MessageViewSet
from mailboxes.api.waiting import CodeLatestView, MessageWaitView

router = SimpleRouter()
router.register("mailboxes", views.MailboxViewSet, basename="mailbox")
router.register("messages", MessageViewSet, basename="message")
router.register("pools", PoolViewSet, basename="pool")
router.register("bindings", BindingViewSet, basename="binding")
router.register("providers", ProviderViewSet, basename="provider")

urlpatterns = [
    # Before the router's messages/<pk>/ so "wait" is never taken for an id.
    path("messages/wait/", MessageWaitView.as_view(), name="message-wait"),
    path("bindings/link-or-create", LinkOrCreateView.as_view(), name="binding-link-or-create"),
    *router.urls,
    # Raw upload into a mailbox; the view lives with the rest of the mail path in ingest/.
    path("mailboxes/<uuid:pk>/messages/", MessageUploadView.as_view(), name="mailbox-messages-upload"),
    path("mailboxes/<uuid:pk>/codes/latest/", CodeLatestView.as_view(), name="mailbox-code-latest"),
    # Pools and bindings (mailboxes/bindings/): a link is a secret of the host's, in the path
    # like a resource id, answered 404 alike whether unknown, released or another tenant's.
    path("links/<str:link>/", LinkDetailView.as_view(), name="link-detail"),
    path("links/<str:link>/codes/latest/", LinkCodeLatestView.as_view(), name="link-code-latest"),
    # <path:>: an account_ref is the host's opaque id and may hold "/" (sent as %2F, which the
    # server decodes before routing); the fixed suffix still ends it.
    path("accounts/<path:account_ref>/codes/latest/", AccountCodeLatestView.as_view(), name="account-code-latest"),
    path(
        "messages/<uuid:pk>/attachments/<uuid:attachment_id>/",
        AttachmentDownloadView.as_view({"get": "retrieve"}),
        name="message-attachment",
    ),
]
