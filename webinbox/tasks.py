"""Celery tasks for the web side (queue ``maintenance``): thin and idempotent."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task

from webinbox import services


@shared_task(acks_late=True, ignore_result=True, soft_time_limit=60, time_limit=90)
def login_tokens_purge(grace_seconds: int = 86400) -> int:
    """Beat: delete sign-in links that expired or were used more than ``grace_seconds`` ago."""
    return services.login_tokens_purge(grace=timedelta(seconds=grace_seconds))
