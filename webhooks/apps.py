from django.apps import AppConfig


class WebhooksConfig(AppConfig):
    name = "webhooks"
    verbose_name = "Webhooks"

    def ready(self) -> None:
        from audit.selectors import event_detail_extra_register
        from audit.services import event_listener_register
        from webhooks import metrics, selectors, services

        # Deliveries are created inside the transaction that records the event.
        event_listener_register(services.events_fan_out)
        event_detail_extra_register(selectors.event_deliveries_extra)  # type: ignore[arg-type]
        metrics.register_backlog_collector()
