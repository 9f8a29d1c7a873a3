from django.urls import path
from rest_framework.routers import SimpleRouter

from ingest.api.views import MessageUploadView
from mailboxes.api import views
from mailboxes.api.messages import AttachmentDownloadView, MessageViewSet
from mailboxes.api.waiting import CodeLatestView, MessageWaitView

router = SimpleRouter()
router.register("mailboxes", views.MailboxViewSet, basename="mailbox")
router.register("messages", MessageViewSet, basename="message")

urlpatterns = [
    # Before the router's messages/<pk>/ so "wait" is never taken for an id.
    path("messages/wait/", MessageWaitView.as_view(), name="message-wait"),
    *router.urls,
    # Raw upload into a mailbox; the view lives with the rest of the mail path in ingest/.
    path("mailboxes/<uuid:pk>/messages/", MessageUploadView.as_view(), name="mailbox-messages-upload"),
    path("mailboxes/<uuid:pk>/codes/latest/", CodeLatestView.as_view(), name="mailbox-code-latest"),
    path(
        "messages/<uuid:pk>/attachments/<uuid:attachment_id>/",
        AttachmentDownloadView.as_view({"get": "retrieve"}),
        name="message-attachment",
    ),
]
