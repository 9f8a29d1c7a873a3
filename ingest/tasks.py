"""Celery tasks of the mail path's front half (registered on the beat in mailplatform/celery.py)."""

from __future__ import annotations

from celery import shared_task

from ingest import heartbeats, idempotency


@shared_task(name="ingest.tasks.ingest_rows_purge", ignore_result=True, soft_time_limit=120, time_limit=180)
def ingest_rows_purge() -> None:
    """Delete expired upload idempotency keys and the heartbeats of long-gone nodes."""
    idempotency.idempotency_keys_purge()
    heartbeats.heartbeats_purge()
