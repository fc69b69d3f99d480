"""``fleetline ingest``: MQTT telemetry and status into the database."""

from __future__ import annotations

import logging

from fleetline import db, service
from fleetline.logs import setup_logging
from fleetline.settings import StorageSettings
from fleetline_ingest.consumer import Ingestor
from fleetline_ingest.settings import IngestSettings
from fleetline_ingest.writer import init_connection

log = logging.getLogger(__name__)


async def run(settings: IngestSettings, storage: StorageSettings) -> None:
    await db.wait_for_database(settings.dsn)
    # One connection writes (batches are committed in order); one spare for upkeep and
    # readiness checks.
    pool = await db.create_pool(settings.dsn, min_size=1, max_size=3, init=init_connection)
    try:
        ingestor = Ingestor(settings, storage, pool)
        probes = await service.serve_probes(
            settings.http_host, settings.http_port, ready=ingestor.ready
        )
        try:
            await ingestor.run()
        finally:
            probes.close()
    finally:
        await db.close_pool(pool)


def main() -> None:
    settings = IngestSettings()
    storage = StorageSettings()
    setup_logging("ingest", level=settings.log_level, fmt=settings.log_format)
    log.info(
        "starting ingest",
        extra={
            "client_id": settings.client_id,
            "batch_rows": settings.batch_rows,
            "batch_ms": settings.batch_ms,
        },
    )
    service.run(run(settings, storage))
