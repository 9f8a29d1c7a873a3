from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from webinbox.services import demo_bootstrap


class Command(BaseCommand):
    help = "Create the demo tenant, domain and mailbox if missing; print them with a new API key and login link."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args: Any, **options: Any) -> None:
        demo = demo_bootstrap()
        if options["json"]:
            self.stdout.write(json.dumps(demo))
            return
        width = max(len(key) for key in demo)
        for key, value in demo.items():
            self.stdout.write(f"{key.ljust(width)}  {value}")
