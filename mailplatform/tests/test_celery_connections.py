"""Celery workers keep their database connection across tasks, as web processes do across requests."""

from __future__ import annotations

from typing import Any

import pytest
from celery.fixups.django import DjangoWorkerFixup
from django.db import connection

from mailboxes.tasks import message_parse
from mailplatform.celery import _connections_recycle, app

pytestmark = pytest.mark.django_db(transaction=True)


def _backend_pid() -> Any:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def test_a_worker_reuses_its_connection_from_one_task_to_the_next() -> None:
    fixup = DjangoWorkerFixup(app)
    first = _backend_pid()
    for _ in range(3):  # what the worker does around each task
        fixup.on_task_prerun(sender=message_parse)
        _connections_recycle()
        fixup.on_task_postrun(sender=message_parse)
        _connections_recycle()
    assert _backend_pid() == first


def test_a_connection_older_than_conn_max_age_is_replaced_between_tasks() -> None:
    first = _backend_pid()
    connection.close_at = 0  # as if CONN_MAX_AGE had passed
    _connections_recycle()
    assert _backend_pid() != first


@pytest.mark.django_db
def test_a_task_run_eagerly_inside_a_transaction_leaves_the_callers_connection_alone() -> None:
    from django.db import transaction

    from tenants.models import Tenant

    with transaction.atomic():
        Tenant.objects.create(name="Eager", slug="eager")
        message_parse.apply(args=["00000000-0000-0000-0000-000000000000"])  # prerun, postrun: eager
        assert Tenant.objects.filter(slug="eager").exists()  # same connection, same transaction
