"""``python manage.py runconnectors``: pull mail from IMAP accounts (ingest/imap/runner.py)."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from ingest.imap.runner import Runner, owner_name


class Command(BaseCommand):
    help = "Hold the IMAP connectors this runner can lease: IDLE or poll, and take new mail in."
    requires_system_checks: list[str] = []  # starts even while the database is down

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--capacity", type=int, default=settings.CONNECTOR_CAPACITY, help="Most accounts held")
        parser.add_argument("--node", default="", help="Name in leases and heartbeats (default: host name)")
        parser.add_argument(
            "--stagger", type=float, default=float(settings.CONNECTOR_STARTUP_STAGGER),
            help="Spread the first connects over this many seconds",
        )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        runner = Runner(
            owner=owner_name(options["node"] or None), capacity=max(1, options["capacity"]), stagger=options["stagger"]
        )

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)

            def ready() -> None:
                self.stdout.write(f"runconnectors ready as {runner.owner} (capacity {runner.capacity})")
                self.stdout.flush()

            await runner.run(stop, ready=ready)

        asyncio.run(main())
