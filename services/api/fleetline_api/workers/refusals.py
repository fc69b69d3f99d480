"""Publishes the broker refused over devices' limits, as metrics.

The broker's auth plugin adds each device's refusals to ``device_limit_refusals`` every
few seconds; every API process exports the totals (the same values on each replica:
aggregate them with ``max``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from prometheus_client import Gauge

log = logging.getLogger(__name__)

REFRESH_SECONDS = 15.0
REFUSED_MESSAGES = Gauge(
    "fleetline_device_limit_refused_messages",
    "Publishes the broker refused for being over a device's limits, all devices, ever",
)
REFUSED_BYTES = Gauge(
    "fleetline_device_limit_refused_bytes", "Bytes of those publishes, all devices, ever"
)
DEVICES_OVER = Gauge(
    "fleetline_devices_over_limit", "Devices with publishes refused in the last 5 minutes"
)
TOTALS = """
SELECT coalesce(sum(messages), 0) AS messages, coalesce(sum(bytes), 0) AS bytes,
       count(*) FILTER (WHERE last_refused_at > now() - interval '5 minutes') AS devices
FROM device_limit_refusals
"""


async def run(pool: Any) -> None:
    """Refresh the gauges until cancelled."""
    while True:
        try:
            row = await pool.fetchrow(TOTALS)
            REFUSED_MESSAGES.set(row["messages"])
            REFUSED_BYTES.set(row["bytes"])
            DEVICES_OVER.set(row["devices"])
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("cannot read the limit refusals: %r", exc)
        await asyncio.sleep(REFRESH_SECONDS)
