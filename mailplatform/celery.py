"""The Celery application. Queues: ingest, parse, index, webhooks, maintenance, outbound."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_prerun, worker_process_shutdown, worker_ready, worker_shutdown
from django.conf import settings
from kombu import Exchange, Queue

from mailplatform import config

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailplatform.settings")
# Every entry point imports this package (and so this module) first: a wrong setting stops
# here with one line and exit code 2, not a traceback from wherever settings were touched.
config.settings_load_or_exit()

app = Celery("mailplatform")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Each queue has its own exchange and routing key. A bare Queue(name) is bound to the default
# exchange with the default routing key, so every task would land in all five queues.
QUEUES = ("ingest", "parse", "index", "webhooks", "maintenance", "outbound")
app.conf.task_queues = [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES]
app.autodiscover_tasks()

# Periodic tasks are registered here and only here; django-celery-beat stores them.
app.conf.beat_schedule = {
    # Due webhook deliveries: retries, lost broker messages, expired claims of dead workers.
    "webhooks-dispatch": {"task": "webhooks.tasks.deliveries_dispatch", "schedule": 2.0},
    # Messages stuck in stored/parsed (lost broker messages, crashed workers): re-enqueued.
    "messages-stuck-sweep": {"task": "mailboxes.tasks.messages_stuck_sweep", "schedule": 60.0},
    # Retention per tenant/mailbox, temporary mailbox expiry, blob purge of deleted mail.
    "messages-retention-sweep": {"task": "mailboxes.tasks.messages_retention_sweep", "schedule": 300.0},
    # Messages whose antivirus scan failed (clamd away, accepted fail-open): scanned again.
    "messages-rescan-sweep": {"task": "mailboxes.tasks.messages_rescan_sweep", "schedule": 60.0},
    # Trust verdicts with a temperror (DNS timeout, SERVFAIL): verified again, a few times with backoff.
    "messages-reverify-sweep": {"task": "mailboxes.tasks.messages_reverify_sweep", "schedule": 60.0},
    # Domain DNS checks (verification, MX monitoring); each domain at most every DOMAIN_CHECK_INTERVAL.
    "domains-check": {"task": "tenants.tasks.domains_check_due", "schedule": float(settings.DOMAIN_CHECK_SWEEP)},
    # Sign-in links that expired or were used more than a day ago.
    "login-tokens-purge": {"task": "webinbox.tasks.login_tokens_purge", "schedule": 3600.0},
    # Upload idempotency keys past their lifetime, heartbeats of nodes gone for a day.
    "ingest-rows-purge": {"task": "ingest.tasks.ingest_rows_purge", "schedule": 600.0},
    # Outbound recipients due (retries, lost broker messages, claims of dead workers run out).
    "outbound-dispatch": {"task": "outbound.tasks.recipients_due_dispatch", "schedule": 5.0},
}


@task_prerun.connect
@task_postrun.connect
def _connections_recycle(sender: Any = None, **kwargs: Any) -> None:
    """Around each task, what Django does around each request: drop a connection that is
    broken or older than CONN_MAX_AGE and re-arm its health check (CONN_HEALTH_CHECKS); a
    healthy one is reused by the thread's next task. Not for a task run eagerly, inside its
    caller's code (and maybe its transaction): that connection is the caller's."""
    if getattr(getattr(sender, "request", None), "is_eager", False):
        return
    from django.db import close_old_connections

    close_old_connections()


@worker_process_shutdown.connect
def _metrics_process_dead(pid: int | None = None, **kwargs: Any) -> None:
    """A pool process that ends takes its live gauges out of the node's /metrics sums."""
    from mailplatform.metrics import process_dead

    process_dead(pid or os.getpid())


@worker_ready.connect
def _heartbeat_start(sender: Any = None, **kwargs: Any) -> None:
    """The worker says it is alive (ingest/heartbeats.py: /readyz and /metrics show it)."""
    import socket

    from ingest.heartbeats import worker_heartbeat_start

    worker_heartbeat_start(node=getattr(sender, "hostname", None) or socket.gethostname())


@worker_shutdown.connect
def _heartbeat_stop(**kwargs: Any) -> None:
    from ingest.heartbeats import worker_heartbeat_stop

    worker_heartbeat_stop()
