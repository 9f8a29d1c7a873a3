from django.urls import path, re_path

from audit.api import audit, views
from audit.models import EVENT_ID_PATTERN

urlpatterns = [
    path("audit/", audit.AuditEntryListView.as_view(), name="audit-list"),
    path("audit/export/", audit.AuditExportView.as_view(), name="audit-export"),
    path("events/", views.EventListView.as_view(), name="event-list"),
    re_path(rf"^events/(?P<event_id>{EVENT_ID_PATTERN})/$", views.EventDetailView.as_view(), name="event-detail"),
]
