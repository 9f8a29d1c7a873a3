"""The log line of an audit entry appears only once the entry is committed."""

from __future__ import annotations

import logging

import pytest
from django.db import transaction

from audit import context
from audit.models import AuditEntry
from audit.services import Actor, audit_entry_record


class _RolledBack(Exception):
    pass


def _audit_lines(caplog):
    return [r for r in caplog.records if r.name == "audit.services" and r.getMessage().startswith("audit ")]


def test_it_logs_no_audit_line_for_a_write_that_is_rolled_back(world, caplog, django_capture_on_commit_callbacks):
    caplog.set_level(logging.INFO, logger="audit.services")
    actor = Actor(type="user", label=world.owner.email, user_id=world.owner.pk)

    def write_then_fail() -> None:
        with transaction.atomic():
            audit_entry_record(tenant_id=world.tenant.pk, actor=actor, action="tenant.update", resource_id="rolled")
            raise _RolledBack

    with django_capture_on_commit_callbacks(execute=True), pytest.raises(_RolledBack):
        write_then_fail()
    assert not AuditEntry.objects.filter(resource_id="rolled").exists()
    assert _audit_lines(caplog) == []


def test_it_logs_the_audit_line_once_the_write_commits_with_its_trace_id(
    world, caplog, django_capture_on_commit_callbacks
):
    caplog.set_level(logging.INFO, logger="audit.services")
    actor = Actor(type="user", label=world.owner.email, user_id=world.owner.pk)
    # The callbacks run when the outer block exits, after the request's context is gone.
    with (
        django_capture_on_commit_callbacks(execute=True) as callbacks,
        context.bind(correlation_id="trace-audit-1"),
        transaction.atomic(),
    ):
        audit_entry_record(tenant_id=world.tenant.pk, actor=actor, action="tenant.update", resource_id="kept")
        assert _audit_lines(caplog) == []  # not yet: the transaction is still open
    assert callbacks
    [line] = _audit_lines(caplog)
    assert line.getMessage() == f"audit tenant.update :kept by {world.owner.email}"
    assert line.trace_id == "trace-audit-1"
    assert AuditEntry.objects.filter(resource_id="kept").exists()
