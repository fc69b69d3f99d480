"""``fleetline rules``: the rules service process.

This first version runs the process frame every rule feature plugs into: settings,
database pool, probes and metrics, graceful shutdown. Rule evaluation, alarms and
offline detection are added on top of it.
"""

from __future__ import annotations

import asyncio
import logging

from fleetline import db, service
from fleetline.logs import setup_logging
from fleetline.settings import load
from fleetline_rules.settings import RulesSettings

log = logging.getLogger(__name__)


async def run(settings: RulesSettings) -> None:
    await db.wait_for_database(settings.dsn)
    pool = await db.create_pool(settings.dsn, min_size=1, max_size=2)

    async def ready() -> bool:
        return await db.answers(pool)

    probes = await service.serve_probes(settings.http_host, settings.http_port, ready=ready)
    try:
        await asyncio.Event().wait()
    finally:
        probes.close()
        await db.close_pool(pool)


def main() -> None:
    settings = load(RulesSettings)
    setup_logging("rules", level=settings.log_level, fmt=settings.log_format)
    log.info("starting rules")
    service.run(run(settings))
