"""Per-IP limits count an IPv6 client by its /64 (RFC 6177: an end site gets at least that)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from django.core import mail
from django.test import Client

from mailplatform import ratelimit
from mailplatform.clientip import rate_limit_subject
from webinbox.models import TempInbox
from webinbox.services import outbound_flush


@pytest.mark.parametrize(
    ("address", "subject"),
    [
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::1%eth0", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("203.0.113.9", "203.0.113.9"),
        (None, "-"),
        ("not an address", "-"),
    ],
)
def test_it_keys_a_client_by_its_ipv4_address_or_ipv6_network(address: str | None, subject: str) -> None:
    assert rate_limit_subject(address) == subject


def test_it_follows_rate_limit_ipv6_prefix(settings: Any) -> None:
    settings.RATE_LIMIT_IPV6_PREFIX = 56
    assert rate_limit_subject("2001:db8:1:2ff::1") == "2001:db8:1:200::/56"
    settings.RATE_LIMIT_IPV6_PREFIX = 128
    assert rate_limit_subject("2001:db8:1:2::1") == "2001:db8:1:2::1/128"


def test_it_limits_temporary_inboxes_per_ipv6_64_not_per_address(db: Any, settings: Any) -> None:
    settings.TEMP_INBOX_RATE_PER_HOUR = 2
    # Three addresses of one /64: the third is the same client picking a new address.
    for index, address in enumerate(("2001:db8:7:1::1", "2001:db8:7:1::2", "2001:db8:7:1:ffff::3")):
        answer = Client(REMOTE_ADDR=address).post("/")
        assert answer.status_code == (302 if index < 2 else 429), address
    assert Client(REMOTE_ADDR="2001:db8:7:2::1").post("/").status_code == 302  # the next /64
    assert TempInbox.objects.count() == 3


@pytest.mark.django_db(transaction=True)  # the sign-in mail is sent from a thread of its own
def test_it_limits_sign_in_link_requests_per_ipv6_64(world: Any, settings: Any) -> None:
    settings.LOGIN_RATE_PER_IP = 1
    first = Client(REMOTE_ADDR="2001:db8:9:1::10")
    first.post("/login/", {"email": world.owner.email})
    second = Client(REMOTE_ADDR="2001:db8:9:1::11")
    second.post("/login/", {"email": world.member.email})
    outbound_flush()
    assert [message.to for message in mail.outbox] == [[world.owner.email]]


def _clock_at(monkeypatch: Any, now: float) -> None:
    """The rate-limit counters' clock, set to ``now`` (seconds since the epoch)."""

    class Clock:
        @staticmethod
        def time() -> float:
            return now

    monkeypatch.setattr(ratelimit, "time", Clock)


def test_it_refuses_a_second_burst_just_after_the_window_boundary(monkeypatch: Any) -> None:
    subject, boundary = f"burst-{uuid.uuid4()}", 1_000_000 * 3600
    _clock_at(monkeypatch, boundary - 2)
    assert all(ratelimit.hit("test", subject, limit=10, window=3600) for _ in range(10))
    assert not ratelimit.hit("test", subject, limit=10, window=3600)
    _clock_at(monkeypatch, boundary + 2)  # a new clock hour, but the ten were seconds ago
    assert not ratelimit.hit("test", subject, limit=10, window=3600)
    assert ratelimit.used("test", subject, window=3600) == 10
    # Until the previous hour's share falls to nine: 10 * (1 - t / 3600) <= 9.
    assert ratelimit.seconds_left(3600, "test", subject, limit=10) == 360 - 2


def test_it_lets_the_count_recover_gradually_over_the_next_window(monkeypatch: Any) -> None:
    subject, boundary = f"recover-{uuid.uuid4()}", 1_000_001 * 3600
    _clock_at(monkeypatch, boundary - 1)
    assert all(ratelimit.hit("test", subject, limit=10, window=3600) for _ in range(10))
    _clock_at(monkeypatch, boundary + 360)  # a tenth of the hour gone: room for one
    assert ratelimit.hit("test", subject, limit=10, window=3600)
    assert not ratelimit.hit("test", subject, limit=10, window=3600)
    _clock_at(monkeypatch, boundary + 1800)  # half of it: five of the ten still count
    assert ratelimit.used("test", subject, window=3600) == 6
    assert [ratelimit.hit("test", subject, limit=10, window=3600) for _ in range(5)] == [True] * 4 + [False]
    _clock_at(monkeypatch, boundary + 3600)  # the burst's hour is two windows back now
    assert ratelimit.used("test", subject, window=3600) == 5  # the last hour's five, at full weight


def test_it_answers_retry_after_until_a_temporary_inbox_is_allowed_again(
    db: Any, settings: Any, monkeypatch: Any
) -> None:
    settings.TEMP_INBOX_RATE_PER_HOUR = 2
    boundary = 1_000_002 * 3600
    _clock_at(monkeypatch, boundary - 60)
    client = Client(REMOTE_ADDR="203.0.113.77")
    assert [client.post("/api/v1/temp-inboxes/").status_code for _ in range(2)] == [201, 201]
    _clock_at(monkeypatch, boundary + 60)
    refused = client.post("/api/v1/temp-inboxes/")
    assert refused.status_code == 429
    # 2 * (1 - t / 3600) <= 1 at t = 1800 into the new hour.
    assert refused["Retry-After"] == str(1800 - 60)


def _cache_of(kind: str, tmp_path: Any, settings: Any) -> dict[str, Any]:
    """A cache of each backend the settings may choose, whose default timeout (the one Django's
    file cache ``incr`` stores again) is one second, so losing a window's TTL shows at once."""
    backends = {
        "file": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": str(tmp_path)},
        "locmem": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "ratelimit-ttl"},
        "redis": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": settings.CELERY_BROKER_URL,
            "KEY_PREFIX": f"test-ttl-{uuid.uuid4()}",
        },
    }
    return {"default": {**backends[kind], "TIMEOUT": 1}}


@pytest.mark.parametrize("kind", ["file", "locmem", "redis"])
def test_it_keeps_counting_a_window_longer_than_the_caches_default_timeout(
    kind: str, tmp_path: Any, settings: Any
) -> None:
    settings.CACHES = _cache_of(kind, tmp_path, settings)
    subject = f"ttl-{uuid.uuid4()}"
    assert all(ratelimit.hit("test", subject, limit=3, window=3600) for _ in range(3))
    assert not ratelimit.hit("test", subject, limit=3, window=3600)  # a refusal takes its count back (decr)
    time.sleep(1.5)  # past the cache's default timeout, well inside the hour
    assert ratelimit.used("test", subject, window=3600) == 3
    assert not ratelimit.hit("test", subject, limit=3, window=3600)


def _settings_cache(monkeypatch: Any, cache_url: str) -> dict[str, Any]:
    """The CACHES the settings module builds for ``CACHE_URL`` (read afresh, this process untouched)."""
    import runpy
    from pathlib import Path

    from mailplatform import settings as settings_module

    monkeypatch.setenv("CACHE_URL", cache_url)
    return runpy.run_path(str(Path(settings_module.__file__)))["CACHES"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["file", "locmem"])
def test_it_keeps_a_live_counter_through_a_flood_of_other_keys(
    kind: str, tmp_path: Any, settings: Any, monkeypatch: Any
) -> None:
    caches = _settings_cache(monkeypatch, f"file://{tmp_path}" if kind == "file" else "locmem://")
    caches["default"].setdefault("LOCATION", f"flood-{uuid.uuid4()}")  # a locmem cache of its own
    settings.CACHES = caches
    subject = f"live-{uuid.uuid4()}"
    assert ratelimit.hit("test", subject, limit=5, window=3600)
    assert ratelimit.hit("test", subject, limit=5, window=3600)
    for number in range(1000):  # one new key each, like a flood of new client addresses
        ratelimit.hit("flood", f"client-{number}", limit=5, window=3600)
    assert ratelimit.used("test", subject, window=3600) == 2
    assert caches["default"]["OPTIONS"]["MAX_ENTRIES"] >= 100_000


def test_it_counts_the_file_caches_folder_at_most_once_an_interval(tmp_path: Any) -> None:
    from django.core.cache.backends.filebased import FileBasedCache as DjangoFileBasedCache

    from mailplatform.cache import FileBasedCache

    options = {"MAX_ENTRIES": 50, "CULL_FREQUENCY": 2, "CULL_INTERVAL": 3600}
    bounded = FileBasedCache(str(tmp_path / "slow"), {"OPTIONS": options})
    for number in range(120):
        bounded.set(f"key-{number}", number)
    # Counted (and culled) at the first write only: the folder passed its bound meanwhile.
    assert len(bounded._list_cache_files()) == 120
    eager = FileBasedCache(str(tmp_path / "eager"), {"OPTIONS": {**options, "CULL_INTERVAL": 0}})
    django = DjangoFileBasedCache(str(tmp_path / "django"), {"OPTIONS": options})
    for number in range(120):
        eager.set(f"key-{number}", number)
        django.set(f"key-{number}", number)
    assert len(eager._list_cache_files()) == len(django._list_cache_files()) <= 50  # Django's own bound
