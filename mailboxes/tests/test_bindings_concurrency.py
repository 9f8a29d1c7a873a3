"""Link-or-create and allocation under real concurrency: threads, each with its own
PostgreSQL connection, released together by a barrier (no mocks).

The server's max_connections is shared with everything else on the machine, so the calls
go through BINDING_TEST_THREADS threads at a time (25 by default), all started together.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.db.models import Count, Q

from mailboxes.bindings import services
from mailboxes.models import AccountBinding, MailboxPool, PoolMailbox
from tenants.access import Principal

THREADS = int(os.environ.get("BINDING_TEST_THREADS", "25"))


def _concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls in THREADS threads started together; each result or the exception raised."""
    results: list[Any] = [None] * len(calls)
    barrier = threading.Barrier(min(THREADS, len(calls)))
    lanes = [list(range(lane, len(calls), THREADS)) for lane in range(min(THREADS, len(calls)))]

    def run(indexes: list[int]) -> None:
        try:
            barrier.wait(timeout=30)
            for index in indexes:
                try:
                    results[index] = calls[index]()
                except Exception as error:
                    results[index] = error
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(lane,)) for lane in lanes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    return results


def _pool(world: Any, *, size: int, **settings: Any) -> MailboxPool:
    return services.pool_create(
        principal=Principal.system(world.tenant), domain=world.domain, name="accounts", size=size, **settings
    )


def _counts_match(pool: MailboxPool) -> None:
    """Every member's counter equals its active bindings (the counter allocation relies on)."""
    actual = dict(
        AccountBinding.objects.filter(pool=pool, active=True)
        .values_list("mailbox_id")
        .annotate(n=Count("id"))
        .order_by()
    )
    for member in PoolMailbox.objects.filter(pool=pool):
        assert member.active_bindings == actual.get(member.mailbox_id, 0)


def _link_or_create(world: Any, pool: MailboxPool, account: str, provider: str) -> Callable[[], Any]:
    principal = Principal.system(world.tenant)
    return lambda: services.binding_link_or_create(
        principal=principal, pool=pool, account_ref=account, provider=provider
    )


def test_it_creates_exactly_one_binding_for_a_hundred_concurrent_calls(world, transactional_db):
    pool = _pool(world, size=10)
    results = _concurrently([_link_or_create(world, pool, "acct-1", "google") for _ in range(100)])
    assert not [r for r in results if isinstance(r, Exception)], results
    assert AccountBinding.objects.filter(account_ref="acct-1").count() == 1
    binding = AccountBinding.objects.get(account_ref="acct-1")
    assert {result.binding.pk for result in results} == {binding.pk}
    created = [result for result in results if result.created]
    assert len(created) == 1
    assert created[0].link.startswith("mpl_")
    assert all(result.link is None for result in results if not result.created)
    _counts_match(pool)


def test_it_never_puts_two_accounts_of_one_provider_in_a_mailbox_under_concurrency(world, transactional_db):
    pool = _pool(world, size=5, max_bindings_per_mailbox=10)
    calls = [_link_or_create(world, pool, f"acct-{n}", "google") for n in range(25)]
    calls += [_link_or_create(world, pool, f"gh-{n}", "github") for n in range(3)]
    results = _concurrently(calls)
    exhausted = [r for r in results if isinstance(r, services.BindingConflict)]
    assert {error.code for error in exhausted} == {"pool_exhausted"}
    assert len(exhausted) == 20  # five mailboxes: five google accounts, the github ones fit
    per_mailbox = Counter(
        AccountBinding.objects.filter(pool=pool, active=True, provider="google").values_list("mailbox_id", flat=True)
    )
    assert len(per_mailbox) == 5
    assert set(per_mailbox.values()) == {1}
    assert AccountBinding.objects.filter(pool=pool, provider="github").count() == 3
    _counts_match(pool)


def test_it_gives_each_account_its_own_mailbox_in_a_dedicated_pool_under_concurrency(world, transactional_db):
    pool = _pool(world, size=10, policy=MailboxPool.Policy.DEDICATED)
    results = _concurrently([_link_or_create(world, pool, f"acct-{n}", f"p{n}") for n in range(30)])
    assert sum(1 for r in results if isinstance(r, services.BindingConflict)) == 20
    loads = Counter(AccountBinding.objects.filter(pool=pool, active=True).values_list("mailbox_id", flat=True))
    assert len(loads) == 10
    assert set(loads.values()) == {1}
    _counts_match(pool)


def test_it_spreads_concurrent_accounts_evenly_in_a_least_bound_pool(world, transactional_db):
    pool = _pool(world, size=5, max_bindings_per_mailbox=4, one_per_provider=False)
    results = _concurrently([_link_or_create(world, pool, f"acct-{n}", "google") for n in range(20)])
    assert not [r for r in results if isinstance(r, Exception)], results
    assert set(PoolMailbox.objects.filter(pool=pool).values_list("active_bindings", flat=True)) == {4}
    _counts_match(pool)


def test_it_provisions_within_the_maximum_under_a_burst(world, transactional_db):
    pool = _pool(
        world,
        size=2,
        policy=MailboxPool.Policy.DEDICATED,
        auto_provision=True,
        provision_threshold=2,
        provision_batch=3,
        max_mailboxes=12,
    )
    results = _concurrently([_link_or_create(world, pool, f"acct-{n}", "google") for n in range(40)])
    refused = [r for r in results if isinstance(r, Exception)]
    assert all(isinstance(r, services.BindingConflict) and r.code == "pool_exhausted" for r in refused), {
        (type(r).__name__, getattr(r, "code", ""), str(r)[:200]) for r in refused
    }
    assert PoolMailbox.objects.filter(pool=pool).count() == 12
    assert AccountBinding.objects.filter(pool=pool, active=True).count() == 12
    assert len(refused) == 28
    _counts_match(pool)
    from audit.models import Event

    provisioned = Event.objects.filter(tenant=world.tenant, type="pool.provisioned")
    assert sum(event.data["mailboxes"] for event in provisioned) == 12  # 2 at creation, 10 by the burst
    assert Event.objects.filter(tenant=world.tenant, type="pool.exhausted").exists()


def test_it_answers_the_same_binding_for_concurrent_reassign_and_link_or_create(world, transactional_db):
    pool = _pool(world, size=4, one_per_provider=False)
    first = services.binding_link_or_create(
        principal=Principal.system(world.tenant), pool=pool, account_ref="acct", provider="google"
    )
    principal = Principal.system(world.tenant)

    def reassign() -> Any:
        return services.binding_reassign(principal=principal, binding=first.binding)

    results = _concurrently([reassign] * 5 + [_link_or_create(world, pool, "acct", "google")] * 10)
    reassigned = [r for r in results[:5] if isinstance(r, AccountBinding)]
    assert len(reassigned) == 1  # the others find the binding inactive
    others = [r for r in results[:5] if not isinstance(r, AccountBinding)]
    assert all(isinstance(r, services.BindingConflict) and r.code == "binding_inactive" for r in others), others
    assert AccountBinding.objects.filter(account_ref="acct", active=True).count() == 1
    assert AccountBinding.objects.filter(Q(account_ref="acct") & Q(active=False)).count() == 1
    _counts_match(pool)


def test_it_takes_an_allocation_again_when_postgresql_breaks_a_deadlock_with_it(world, transactional_db, monkeypatch):
    """PostgreSQL rolls one of two deadlocked transactions back (SQLSTATE 40P01); that call is
    not a 500: it starts again and binds."""
    import psycopg.errors
    from django.db import OperationalError

    pool = _pool(world, size=2)
    # The first step of an allocation: one statement on PostgreSQL, the step-by-step lock elsewhere.
    first_step = "_bind_at_once" if connection.vendor == "postgresql" else "_allocate"
    real_step = getattr(services, first_step)
    calls = []

    def step_once_deadlocked(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("deadlock detected") from psycopg.errors.DeadlockDetected("deadlock detected")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(services, first_step, step_once_deadlocked)
    result = _link_or_create(world, pool, "acct-deadlock", "google")()
    assert result.created and len(calls) == 2
    assert AccountBinding.objects.filter(account_ref="acct-deadlock", active=True).count() == 1
    _counts_match(pool)

    def step_always_broken(*args, **kwargs):
        raise OperationalError("server closed the connection")  # not a lock conflict: no retry

    monkeypatch.setattr(services, first_step, step_always_broken)
    with pytest.raises(OperationalError):
        _link_or_create(world, pool, "acct-other", "google")()
