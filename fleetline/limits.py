"""The bounds of a device's limits (table ``device_limits``; ``PUT /v1/limits/...``): the
most each may be, which the API checks and what scaling a device's limits stops at."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Each limit's largest value.
MOST: Mapping[str, float | int] = {
    "messages_per_second": 1_000_000,
    "burst_messages": 100_000_000,
    "bytes_per_second": 1e12,
    "burst_bytes": 1 << 40,
}


def scaled(default: Mapping[str, Any], times: int, own: Mapping[str, Any] | None) -> dict[str, Any]:
    """``default`` limits times ``times``, within :data:`MOST`, and no lower than ``own``
    (a device's override already there): rates as floats, bursts as whole numbers."""
    out: dict[str, Any] = {}
    for name, most in MOST.items():
        value = min(default[name] * times, most)
        if own is not None:
            value = max(value, own[name])
        out[name] = float(value) if name.endswith("_per_second") else int(value)
    return out
