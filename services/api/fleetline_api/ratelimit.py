"""Request rates per API key: a token bucket for each key, in each API process.

A key may make ``FLEETLINE_API_RATE_PER_KEY`` requests a second, with bursts up to
``FLEETLINE_API_RATE_BURST_PER_KEY``; beyond, a request is refused with 429 and a
``Retry-After`` (whole seconds) saying when the next one will be let through. The
buckets live in the process: with several API replicas behind a load balancer a key may
make that rate at each (the limit bounds what one script can make one process do).
Buckets exist only for keys that authenticated, so their number is bounded by the keys
that exist; a limiter keyed by something else (client addresses) holds at most
``MAX_BUCKETS``, dropping full ones (they hold nothing a new bucket would not).
"""

from __future__ import annotations

import math
import time

MAX_BUCKETS = 100_000


class KeyRateLimiter:
    def __init__(self, rate_per_second: float, burst: int) -> None:
        self.rate = rate_per_second
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, at)

    def _tokens(self, key_id: str, now: float) -> float:
        """The key's tokens at ``now``: a new key has a full bucket."""
        tokens, at = self._buckets.get(key_id, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def _seconds_to_one(self, tokens: float) -> int | None:
        """None with a token to take; else the whole seconds until there is one."""
        return None if tokens >= 1.0 else max(1, math.ceil((1.0 - tokens) / self.rate))

    def take(self, key_id: str, now: float | None = None) -> int | None:
        """None when the request may go; else the seconds to wait (at least 1)."""
        if self.rate <= 0:
            return None
        now = time.monotonic() if now is None else now
        if key_id not in self._buckets and len(self._buckets) >= MAX_BUCKETS:
            self._prune(now)
        tokens = self._tokens(key_id, now)
        wait = self._seconds_to_one(tokens)
        self._buckets[key_id] = (tokens if wait is not None else tokens - 1.0, now)
        return wait

    def _prune(self, now: float) -> None:
        """Forget the buckets that have filled up again (or, if none has, the oldest half)."""
        full = [k for k in self._buckets if self._tokens(k, now) >= self.burst]
        if not full:
            full = sorted(self._buckets, key=lambda k: self._buckets[k][1])
            full = full[: len(full) // 2]
        for key in full:
            del self._buckets[key]

    def refund(self, key_id: str) -> None:
        """Give back a token :meth:`take` took: for limits counted on failures, taken
        before the work (so concurrent attempts cannot all pass one check) and returned
        when the work succeeded."""
        if key_id in self._buckets:
            tokens, at = self._buckets[key_id]
            self._buckets[key_id] = (min(self.burst, tokens + 1.0), at)

    def wait(self, key_id: str, now: float | None = None) -> int | None:
        """What :meth:`take` would answer, taking nothing: for limits counted on
        failures only (checked before the work, taken after a failure)."""
        if self.rate <= 0 or key_id not in self._buckets:
            return None
        now = time.monotonic() if now is None else now
        return self._seconds_to_one(self._tokens(key_id, now))
