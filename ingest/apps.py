from django.apps import AppConfig


class IngestConfig(AppConfig):
    name = "ingest"
    verbose_name = "Ingest"

    def ready(self) -> None:
        from ingest import heartbeats

        heartbeats.mail_flow_collector_register()  # /metrics: heartbeat ages, spool and parse backlog
