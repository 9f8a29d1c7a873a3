from django.urls import path

from tenants import views

app_name = "tenants"

urlpatterns = [
    path("start/", views.sso_start, name="sso-start"),
    path("callback/", views.sso_callback, name="sso-callback"),
]
