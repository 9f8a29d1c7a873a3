from django.apps import AppConfig


class MailboxesConfig(AppConfig):
    name = "mailboxes"
    verbose_name = "Mailboxes"

    def ready(self) -> None:
        from mailboxes.retention import index_lag_metric_register

        index_lag_metric_register()
