"""Prometheus metrics for webhooks.

Counters and the latency histogram live in the process that sends (the worker); the backlog
gauges are computed from the database at scrape time, so ``/metrics`` of any web process
reports them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from django.db.models import Count, Min, Q
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

DELIVERIES = Counter(
    "mailplatform_webhook_deliveries_total",
    "Webhook delivery outcomes per attempt: delivered, retrying (failed, will retry), dead.",
    ["outcome"],
)
REFUSED = Counter(
    "mailplatform_webhook_refused_total",
    "Attempts refused before connecting (URL policy: non-public address, port, scheme).",
)
ATTEMPT_SECONDS = Histogram(
    "mailplatform_webhook_attempt_seconds",
    "Duration of one webhook HTTP attempt.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15),
)


class BacklogCollector(Collector):
    """Pending and dead counts and how long the most overdue pending delivery has waited."""

    _NAMES = (
        "mailplatform_webhook_pending",
        "mailplatform_webhook_dead",
        "mailplatform_webhook_oldest_pending_age_seconds",
    )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Given, so registering does not call collect() (no database query at start-up).
        for name in self._NAMES:
            yield GaugeMetricFamily(name, name)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from webhooks import clock
        from webhooks.models import Delivery

        now = clock.now()
        try:
            row = Delivery.objects.aggregate(
                pending=Count("pk", filter=Q(state__in=["pending", "sending"], endpoint__enabled=True)),
                dead=Count("pk", filter=Q(state="dead")),
                oldest=Min("next_attempt_at", filter=Q(state="pending", endpoint__enabled=True)),
            )
        except Exception as exc:  # a scrape must not fail because the database is away
            logger.warning("webhook backlog metrics unavailable: %s", type(exc).__name__)
            return
        yield GaugeMetricFamily(
            "mailplatform_webhook_pending", "Deliveries pending or in flight (enabled endpoints).", row["pending"]
        )
        yield GaugeMetricFamily("mailplatform_webhook_dead", "Deliveries that gave up (dead-letter).", row["dead"])
        oldest = row["oldest"]
        age = max((now - oldest).total_seconds(), 0.0) if oldest is not None else 0.0
        yield GaugeMetricFamily(
            "mailplatform_webhook_oldest_pending_age_seconds",
            "How long the most overdue pending delivery has been due.",
            age,
        )


_registered = False


def register_backlog_collector() -> None:
    global _registered
    if not _registered:
        REGISTRY.register(BacklogCollector())
        _registered = True
