from django.apps import AppConfig


class MailaccessConfig(AppConfig):
    name = "mailaccess"
    verbose_name = "Mail access (IMAP and POP3)"
