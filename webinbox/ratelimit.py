"""Fixed-window counters in Django's cache (CACHES): a cheap limit per address, per IP."""

from __future__ import annotations

import hashlib
import time

from django.core.cache import cache

from mailplatform.clientip import rate_limit_subject


def _key(scope: str, subject: str, window: int) -> str:
    # Hashed, so an e-mail address or IP never appears in the cache as such.
    digest = hashlib.sha256(f"{scope}:{subject}".encode()).hexdigest()[:32]
    return f"rl:{scope}:{digest}:{int(time.time()) // window}"


def hit(scope: str, subject: str, *, limit: int, window: int) -> bool:
    """Count one use; False once ``subject`` has used ``scope`` more than ``limit`` times this window."""
    key = _key(scope, subject, window)
    cache.add(key, 0, timeout=window + 5)
    try:
        count = cache.incr(key)
    except ValueError:  # expired between add and incr
        cache.set(key, 1, timeout=window + 5)
        count = 1
    return count <= limit


def hit_ip(scope: str, ip: str | None, *, limit: int, window: int) -> bool:
    """:func:`hit` for a per-client-IP limit: an IPv6 client counts by its network (/64)."""
    return hit(scope, rate_limit_subject(ip), limit=limit, window=window)


def used(scope: str, subject: str, *, window: int) -> int:
    """How many times ``subject`` has used ``scope`` this window (without counting one more)."""
    return int(cache.get(_key(scope, subject, window)) or 0)


def seconds_left(window: int) -> int:
    return window - int(time.time()) % window
