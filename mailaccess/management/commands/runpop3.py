"""``python manage.py runpop3 [--host H] [--port P] [--tls-port P]``: POP3 over the stored mail."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from mailaccess.server import Listener, run_forever


class Command(BaseCommand):
    help = "Serve the stored mail over POP3 (plaintext/STARTTLS port, and an implicit-TLS port when set)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=settings.POP3_HOST)
        parser.add_argument("--port", type=int, default=settings.POP3_PORT)
        parser.add_argument("--tls-port", type=int, default=settings.POP3S_PORT, help="Implicit TLS, 0 for none")

    def handle(self, *args: Any, **options: Any) -> None:
        listeners = [Listener(options["host"], options["port"])]
        if options["tls_port"]:
            listeners.append(Listener(options["host"], options["tls_port"], implicit_tls=True))
        run_forever("pop3", listeners)
