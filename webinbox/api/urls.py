from django.urls import path

from webinbox.api.views import TempInboxCreateView

urlpatterns = [path("temp-inboxes/", TempInboxCreateView.as_view(), name="temp-inbox-create")]
