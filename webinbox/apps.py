from django.apps import AppConfig


class WebinboxConfig(AppConfig):
    name = "webinbox"
    verbose_name = "Web inbox"
