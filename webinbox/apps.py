from django.apps import AppConfig


class WebinboxConfig(AppConfig):
    name = "webinbox"
    verbose_name = "Web inbox"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_logged_in

        from webinbox.services import session_generation_stamp

        # Every way in (magic link, SSO, the admin's password form) starts a session at the
        # user's current generation, so "sign out everywhere" ends exactly the older ones.
        user_logged_in.connect(session_generation_stamp, dispatch_uid="webinbox.session_generation")
