from django.urls import path
from rest_framework.routers import SimpleRouter

from tenants.api import views

router = SimpleRouter()
router.register("domains", views.DomainViewSet, basename="domain")
router.register("api-keys", views.ApiKeyViewSet, basename="api-key")

urlpatterns = [
    path("tenant/", views.TenantView.as_view(), name="tenant"),
    path("sso/", views.SsoView.as_view(), name="sso"),
    *router.urls,
]
