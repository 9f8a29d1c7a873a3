from django.urls import path
from rest_framework.routers import SimpleRouter

from outbound.api import views

router = SimpleRouter()
router.register("outbound-messages", views.OutboundMessageViewSet, basename="outbound-message")
router.register("suppressions", views.SuppressionViewSet, basename="suppression")
router.register(r"domains/(?P<domain_id>[0-9a-fA-F-]{32,36})/dkim-keys", views.DkimKeyViewSet, basename="dkim-key")

urlpatterns = [
    path("messages/send", views.SendView.as_view(), name="message-send"),
    *router.urls,
]
