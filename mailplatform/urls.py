from django.contrib import admin
from django.urls import URLPattern, URLResolver, include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework.permissions import AllowAny

from ingest.views import connector_oauth_callback
from mailboxes.views import blob_download
from mailplatform import ops, views

api_v1: list[URLPattern | URLResolver] = [
    # The API's description is public, like its documentation.
    path(
        "schema/", SpectacularAPIView.as_view(authentication_classes=[], permission_classes=[AllowAny]), name="schema"
    ),
    # Swagger UI from our own static files, its init script served as a file of its own
    # (``?script``): the page needs no CDN and no inline script (a 'self'-only policy).
    path(
        "docs/",
        SpectacularSwaggerSplitView.as_view(
            url_name="schema",
            template_name="api_docs.html",
            authentication_classes=[],
            permission_classes=[AllowAny],
        ),
        name="docs",
    ),
    path("", include("tenants.api.urls")),
    path("", include("mailboxes.api.urls")),
    path("", include("outbound.api.urls")),
    path("", include("audit.api.urls")),
    path("", include("webhooks.api.urls")),
    path("", include("webinbox.api.urls")),
    path("", include("ingest.api.urls")),
]

urlpatterns = [
    path("favicon.ico", views.favicon, name="favicon"),
    path("healthz", ops.healthz, name="healthz"),
    path("readyz", ops.readyz, name="readyz"),
    path("metrics", ops.metrics, name="metrics"),
    path("api/v1/", include(api_v1)),
    # Signed, expiring downloads from the local blob folder (S3 serves presigned URLs itself).
    path("blobs/<str:token>/", blob_download, name="blob-download"),
    path("connectors/oauth/callback/", connector_oauth_callback, name="connector-oauth-callback"),
    path("admin/", admin.site.urls),
    path("login/sso/", include("tenants.urls")),
    path("", include("webinbox.urls")),
]

handler404 = "mailplatform.views.not_found"
handler500 = "mailplatform.views.server_error"
