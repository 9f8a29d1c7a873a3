from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from outbound.submission import serve


class Command(BaseCommand):
    help = "SMTP submission for outgoing mail (RFC 6409): STARTTLS, then AUTH with an API key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=settings.SUBMISSION_HOST)
        parser.add_argument("--port", type=int, default=settings.SUBMISSION_PORT)

    def handle(self, *args: Any, **options: Any) -> None:
        serve(options["host"], options["port"])
