"""The per-key token bucket of the API (fleetline_api/ratelimit.py), on a given clock."""

from __future__ import annotations

import pytest

from fleetline_api.ratelimit import KeyRateLimiter


def test_a_burst_then_the_rate_then_the_wait_asked_for() -> None:
    limiter = KeyRateLimiter(rate_per_second=2.0, burst=3)
    assert [limiter.take("a", now=0.0) for _ in range(3)] == [None, None, None]
    assert limiter.take("a", now=0.0) == 1  # empty: one token comes in 0.5 s
    assert limiter.take("b", now=0.0) is None  # keys have buckets of their own
    assert limiter.take("a", now=0.5) is None  # that token
    assert limiter.take("a", now=0.5) == 1
    # Refilled up to the burst, no more.
    assert [limiter.take("a", now=10.0) for _ in range(4)] == [None, None, None, 1]


def test_a_slow_rate_asks_for_a_longer_wait_and_zero_means_no_limit() -> None:
    slow = KeyRateLimiter(rate_per_second=0.1, burst=1)
    assert slow.take("a", now=0.0) is None
    assert slow.take("a", now=0.0) == 10
    off = KeyRateLimiter(rate_per_second=0, burst=1)
    assert all(off.take("a", now=0.0) is None for _ in range(100))


def test_a_limiter_keyed_by_addresses_holds_a_bounded_number_of_buckets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fleetline_api import ratelimit

    monkeypatch.setattr(ratelimit, "MAX_BUCKETS", 100)
    limiter = KeyRateLimiter(1.0, 2)
    for n in range(1000):
        limiter.take(f"10.0.{n // 256}.{n % 256}", now=0.0)
    assert len(limiter._buckets) <= 100  # noqa: SLF001
    # A guesser still spending its bucket keeps it: only full (or the oldest) ones go.
    assert limiter.take("10.9.9.9", now=0.0) is None
    assert limiter.take("10.9.9.9", now=0.0) is None
    assert limiter.take("10.9.9.9", now=0.0) == 1


def test_a_refund_gives_back_what_was_taken_and_no_more() -> None:
    limiter = KeyRateLimiter(1.0, 2)
    assert limiter.take("a", now=0.0) is None
    assert limiter.take("a", now=0.0) is None
    assert limiter.take("a", now=0.0) == 1  # two attempts in flight spent the bucket
    limiter.refund("a")  # one of them succeeded
    assert limiter.take("a", now=0.0) is None
    limiter.refund("a")
    limiter.refund("a")
    limiter.refund("a")  # never above the burst
    assert [limiter.take("a", now=0.0) for _ in range(3)] == [None, None, 1]
    limiter.refund("unknown")  # nothing to give back: nothing kept
    assert "unknown" not in limiter._buckets  # noqa: SLF001
