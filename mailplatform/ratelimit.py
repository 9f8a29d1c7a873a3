"""Sliding-window counters in Django's cache (CACHES): a cheap limit per address, per IP.

A fixed clock window lets a client spend its whole limit just before the window ends and
all of it again just after (twice the limit within seconds). So each use is counted in
the current fixed window, and the count that is compared with the limit is the two-window
approximation of a sliding window: the current window's count plus the previous window's
count weighted by the share of the previous window still inside the last ``window``
seconds (``current + previous * (1 - elapsed / window)``, the counter NGINX and Cloudflare
use). It assumes the previous window's uses were spread evenly: a burst at the end of one
window is still counted at almost its full weight just after the boundary, and fades out
over the next window. A refused use is not counted, so a client retrying while refused
does not push the end of its own refusal out.

Each window's counter expires at a fixed time (two windows after its start), set again on
every change: Django's file and database caches implement ``incr``/``decr`` as a get and a
``set`` with the cache's default timeout (300 s), which would otherwise make a count of a
longer window vanish five minutes after its last use (Redis and locmem keep the TTL).
"""

from __future__ import annotations

import hashlib
import math
import time

from django.core.cache import cache

from mailplatform.clientip import rate_limit_subject


def _key(scope: str, subject: str, window: int, index: int) -> str:
    # Hashed, so an e-mail address or IP never appears in the cache as such.
    digest = hashlib.sha256(f"{scope}:{subject}".encode()).hexdigest()[:32]
    return f"rl:{scope}:{digest}:{window}:{index}"


def count_add(key: str, delta: int, *, timeout: int) -> int | None:
    """Add ``delta`` to the cached counter at ``key`` and keep it ``timeout`` more seconds;
    the new count, or None if the key is missing (expired)."""
    try:
        count = int(cache.incr(key, delta))
    except ValueError:
        return None
    # incr may have stored the value again with the default timeout: restore the counter's end.
    cache.touch(key, timeout=max(1, timeout))
    return count


def _state(scope: str, subject: str, window: int) -> tuple[str, int, float, float]:
    """The current window's key, the previous window's count, the previous window's weight
    and the seconds elapsed in the current window."""
    now = time.time()
    index = int(now) // window
    elapsed = now - index * window
    previous = int(cache.get(_key(scope, subject, window, index - 1)) or 0)
    return _key(scope, subject, window, index), previous, 1 - elapsed / window, elapsed


def hit(scope: str, subject: str, *, limit: int, window: int) -> bool:
    """Count one use; False (and not counted) once ``subject`` would have used ``scope``
    more than ``limit`` times in the last ``window`` seconds (sliding approximation)."""
    key, previous, weight, elapsed = _state(scope, subject, window)
    # Kept two windows from its start: the next window still weighs this one.
    lifetime = math.ceil(2 * window + 5 - elapsed)
    cache.add(key, 0, timeout=lifetime)
    count = count_add(key, 1, timeout=lifetime)
    if count is None:  # expired between add and incr
        cache.set(key, 1, timeout=lifetime)
        count = 1
    if count + previous * weight <= limit:
        return True
    # A refusal is not counted (None: expired meanwhile, nothing left to take back).
    count_add(key, -1, timeout=lifetime)
    return False


def hit_ip(scope: str, ip: str | None, *, limit: int, window: int) -> bool:
    """:func:`hit` for a per-client-IP limit: an IPv6 client counts by its network (/64)."""
    return hit(scope, rate_limit_subject(ip), limit=limit, window=window)


def used(scope: str, subject: str, *, window: int) -> int:
    """How many times ``subject`` has used ``scope`` in the last ``window`` seconds, as the
    sliding approximation rounded up (without counting one more)."""
    key, previous, weight, _elapsed = _state(scope, subject, window)
    return math.ceil(int(cache.get(key) or 0) + previous * weight - 1e-9)


def seconds_left(window: int, scope: str | None = None, subject: str | None = None, *, limit: int = 1) -> int:
    """Seconds until ``subject`` may use ``scope`` once more (the Retry-After of a refusal).

    Without a scope: the seconds until the current fixed window ends. With one: until the
    sliding count has dropped to ``limit - 1`` if nothing more is counted; at most two windows.
    """
    if scope is None or subject is None:
        return window - int(time.time()) % window
    key, previous, _weight, elapsed = _state(scope, subject, window)
    current = int(cache.get(key) or 0)
    room = limit - 1
    if room < 0:
        return math.ceil(2 * window - elapsed)
    if current <= room:
        if previous == 0 or current + previous * _weight <= room:
            return 1  # a Retry-After of 0 invites an immediate busy loop
        # previous * (1 - t / window) <= room - current, t counted from this window's start.
        wait = window * (1 - (room - current) / previous) - elapsed
    else:
        # This window's own count fades only over the next window.
        wait = (window - elapsed) + window * (1 - room / current)
    return max(1, math.ceil(wait))


def seconds_left_ip(window: int, scope: str, ip: str | None, *, limit: int) -> int:
    """:func:`seconds_left` for a per-client-IP limit (see :func:`hit_ip`)."""
    return seconds_left(window, scope, rate_limit_subject(ip), limit=limit)
