"""``fleetline rules``: the rules service process.

Evaluates the rules (``/v1/rules``) on every reading and status message from the
broker, raises and clears alarms, detects devices gone quiet, and runs the rules'
actions; see :mod:`fleetline_rules.consumer` for how it keeps alarms neither lost nor
duplicated.
"""

from __future__ import annotations

import logging

from fleetline import db, service
from fleetline.logs import setup_logging
from fleetline.settings import load
from fleetline_rules.consumer import RulesService
from fleetline_rules.settings import RulesSettings

log = logging.getLogger(__name__)

# A statement that runs longer is abandoned and retried.
DB_COMMAND_TIMEOUT_SECONDS = 30.0


async def run(settings: RulesSettings) -> None:
    await db.wait_for_database(settings.dsn)
    # Evaluation writes (which gate the acknowledgements), the ticker, the flusher and
    # the rule reload take turns on a few connections; one more for readiness checks.
    pool = await db.create_pool(
        settings.dsn, min_size=1, max_size=5, command_timeout=DB_COMMAND_TIMEOUT_SECONDS
    )
    try:
        # The delivery workers and the route refresh on their own: up to 40 deliveries
        # recording outcomes, or a long registry scan, never hold up a batch's write.
        background = await db.create_pool(
            settings.dsn,
            min_size=1,
            max_size=settings.delivery_pool_size,
            command_timeout=DB_COMMAND_TIMEOUT_SECONDS,
        )
        try:
            rules = RulesService(settings, pool, background)
            await rules.load()
            probes = await service.serve_probes(
                settings.http_host, settings.http_port, ready=rules.ready
            )
            try:
                await rules.run()
            finally:
                probes.close()
        finally:
            await db.close_pool(background)
    finally:
        await db.close_pool(pool)


def main() -> None:
    settings = load(RulesSettings)
    setup_logging("rules", level=settings.log_level, fmt=settings.log_format)
    log.info(
        "starting rules",
        extra={"client_id": settings.client_id, "share_group": settings.share_group},
    )
    service.run(run(settings))
