from django.urls import path
from rest_framework.routers import SimpleRouter

from webhooks.api import views

router = SimpleRouter()
router.register("webhooks", views.EndpointViewSet, basename="webhook")

deliveries = views.DeliveryViewSet.as_view({"get": "list"})
delivery = views.DeliveryViewSet.as_view({"get": "retrieve"})
delivery_retry = views.DeliveryViewSet.as_view({"post": "retry"})

urlpatterns = [
    *router.urls,
    path("webhooks/<uuid:endpoint_id>/deliveries/", deliveries, name="webhook-delivery-list"),
    path("webhooks/<uuid:endpoint_id>/deliveries/<uuid:pk>/", delivery, name="webhook-delivery-detail"),
    path("webhooks/<uuid:endpoint_id>/deliveries/<uuid:pk>/retry/", delivery_retry, name="webhook-delivery-retry"),
]
