from django.apps import AppConfig


class OutboundConfig(AppConfig):
    name = "outbound"
    verbose_name = "Outbound mail"

    def ready(self) -> None:
        from audit.services import event_listener_register
        from outbound import bounces

        # DSNs that come back through our own SMTP ingest to the VERP mailbox are parsed.
        event_listener_register(bounces.bounce_events_listen)
