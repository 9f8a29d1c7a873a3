"""``python manage.py drain_spool``: drain the spool once (recovery; runsmtp drains itself)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from ingest.services import spool_default, spool_drain


class Command(BaseCommand):
    help = "Move every message waiting in the spool into blob storage and the database, once."

    def handle(self, *args: Any, **options: Any) -> None:
        counts = spool_drain(spool_default())
        summary = ", ".join(f"{outcome}: {count}" for outcome, count in sorted(counts.items())) or "spool empty"
        if counts.get("failed"):
            raise CommandError(f"drain incomplete ({summary}); the failed entries stay in the spool")
        self.stdout.write(summary)
