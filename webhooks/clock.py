"""The clock that schedules deliveries, controllable in tests.

Backoff spans seconds to a day; tests move this clock instead of sleeping. Signatures use
the wall clock (``time.time()``) on purpose: receivers check ``webhook-timestamp`` against
their own clock.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.utils import timezone

_offset = timedelta(0)
_frozen: datetime | None = None


def now() -> datetime:
    """The scheduling time: the real time, or the frozen/advanced time set by a test."""
    if _frozen is not None:
        return _frozen
    return timezone.now() + _offset


def freeze(at: datetime | None = None) -> datetime:
    """Stop the clock at ``at`` (default: now)."""
    global _frozen
    _frozen = at or now()
    return _frozen


def advance(seconds: float) -> datetime:
    """Move the clock forward (frozen or not)."""
    global _frozen, _offset
    if _frozen is not None:
        _frozen += timedelta(seconds=seconds)
    else:
        _offset += timedelta(seconds=seconds)
    return now()


def reset() -> None:
    global _frozen, _offset
    _frozen, _offset = None, timedelta(0)
