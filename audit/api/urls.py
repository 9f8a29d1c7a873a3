from django.urls import path

from audit.api import views

urlpatterns = [
    path("events/", views.EventListView.as_view(), name="event-list"),
    path("events/<str:event_id>/", views.EventDetailView.as_view(), name="event-detail"),
]
