"""``fleetline ingest``: MQTT telemetry and status into the database."""

from __future__ import annotations

import logging

from fleetline import db, service
from fleetline.logs import setup_logging
from fleetline.settings import StorageSettings, load
from fleetline_ingest.consumer import Ingestor
from fleetline_ingest.settings import IngestSettings
from fleetline_ingest.writer import init_connection

log = logging.getLogger(__name__)

# A statement that runs longer is abandoned and retried: a half-open connection to the
# database must not hold a batch (and its acknowledgements) forever.
DB_COMMAND_TIMEOUT_SECONDS = 60.0


async def run(settings: IngestSettings, storage: StorageSettings) -> None:
    await db.wait_for_database(settings.dsn)
    # A connection per writer; two spare for upkeep and readiness checks.
    pool = await db.create_pool(
        settings.dsn,
        min_size=1,
        max_size=settings.writers + 2,
        init=init_connection,
        command_timeout=DB_COMMAND_TIMEOUT_SECONDS,
    )
    try:
        # Readings older than the raw retention would vanish with their partition at the
        # next upkeep: they are dead-lettered instead (the server parses the interval).
        retention = await pool.fetchval("SELECT $1::text::interval", storage.raw_retention)
        ingestor = Ingestor(settings, storage, pool, retention=retention)
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
    settings = load(IngestSettings)
    storage = load(StorageSettings)
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
