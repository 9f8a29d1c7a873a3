"""``python manage.py runsmtp [--host H] [--port P] [--lmtp]``: the SMTP/LMTP front door."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from ingest.server import ServerOptions, StartupError, serve


class Command(BaseCommand):
    help = "Receive mail over SMTP (or LMTP with --lmtp) into the spool, and drain it into storage."
    requires_system_checks: list[str] = []  # starts even while the database is down

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=None, help="Default SMTP_HOST (SUBMISSION_HOST with --submission)")
        parser.add_argument(
            "--port", type=int, default=None, help="Default SMTP_PORT (SUBMISSION_PORT with --submission)"
        )
        parser.add_argument(
            "--submission",
            action="store_true",
            help="SMTP submission for outgoing mail instead (outbound/submission.py)",
        )
        parser.add_argument("--lmtp", action="store_true", help="Speak LMTP (RFC 2033) instead of SMTP")
        parser.add_argument("--workers", type=int, default=settings.INGEST_WORKERS, help="Accept processes")
        parser.add_argument(
            "--no-drain", action="store_true", help="Only accept into the spool (drain with drain_spool)"
        )
        parser.add_argument(
            "--metrics-port", type=int, default=settings.INGEST_METRICS_PORT, help="Prometheus port, 0 for none"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["submission"]:
            # The listener lives with outbound mail; called by name, so ingest imports nothing above it.
            from django.core.management import call_command

            host, port = options["host"] or settings.SUBMISSION_HOST, options["port"] or settings.SUBMISSION_PORT
            call_command("runsubmission", host=host, port=port)
            return
        try:
            serve(
                ServerOptions(
                    host=options["host"] or settings.SMTP_HOST,
                    port=options["port"] or settings.SMTP_PORT,
                    lmtp=options["lmtp"],
                    workers=max(1, options["workers"]),
                    drain=settings.INGEST_DRAIN and not options["no_drain"],
                    metrics_port=options["metrics_port"],
                    shutdown_grace=float(settings.INGEST_SHUTDOWN_GRACE),
                )
            )
        except StartupError as exc:  # one line and exit status 1, nothing left running
            raise CommandError(str(exc)) from None
