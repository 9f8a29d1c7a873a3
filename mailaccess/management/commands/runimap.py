"""``python manage.py runimap [--host H] [--port P] [--tls-port P]``: IMAP over the stored mail."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from mailaccess.server import Listener, run_forever


class Command(BaseCommand):
    help = "Serve the stored mail over IMAP (plaintext/STARTTLS port, and an implicit-TLS port when set)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=settings.IMAP_HOST)
        parser.add_argument("--port", type=int, default=settings.IMAP_PORT)
        parser.add_argument("--tls-port", type=int, default=settings.IMAPS_PORT, help="Implicit TLS, 0 for none")

    def handle(self, *args: Any, **options: Any) -> None:
        listeners = [Listener(options["host"], options["port"])]
        if options["tls_port"]:
            listeners.append(Listener(options["host"], options["tls_port"], implicit_tls=True))
        run_forever("imap", listeners)
