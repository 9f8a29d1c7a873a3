from django.urls import path

from webinbox import views

app_name = "webinbox"

urlpatterns = [
    path("", views.home, name="home"),
    path("login/link/<str:token>/", views.login_link, name="login-link"),
    path("inbox/", views.inbox, name="inbox"),
]
