from django.urls import path
from rest_framework.routers import SimpleRouter

from ingest.api.connectors import ConnectorOAuthInitiateView, ConnectorViewSet

router = SimpleRouter()
router.register("connectors", ConnectorViewSet, basename="connector")

urlpatterns = [
    path("connectors/oauth/initiate", ConnectorOAuthInitiateView.as_view(), name="connector-oauth-initiate"),
    *router.urls,
]
