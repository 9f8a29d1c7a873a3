from django.urls import path
from rest_framework.routers import SimpleRouter

from outbound.api import views

router = SimpleRouter()
router.register("outbound-messages", views.OutboundMessageViewSet, basename="outbound-message")
router.register("suppressions", views.SuppressionViewSet, basename="suppression")
router.register(rf"domains/(?P<domain_id>{views._UUID})/dkim-keys", views.DkimKeyViewSet, basename="dkim-key")

urlpatterns = [
    path("messages/send", views.SendView.as_view(), name="message-send"),
    path("domains/<uuid:domain_id>/sending", views.DomainSendingView.as_view(), name="domain-sending"),
    *router.urls,
]
