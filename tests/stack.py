"""A whole backend of its own for a test module (the boards on real MicroPython, the
simulated fleet's rollouts): database, broker with the auth plugin and TLS, ingest, API."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from fleetline import apikeys
from fleetline_dev.certs import TlsFiles
from fleetline_dev.embedded import BrokerAuth, LocalMosquitto, free_port
from tests.conftest import migrated_database
from tests.support import DEVICE_KEY_SECRET, ApiProcess, IngestProcess

# The run's device-key secret (the API's, tests.support) and the services' accounts.
KEY_SECRET = DEVICE_KEY_SECRET.encode()
INGEST_USER = "fleetline-ingest"
API_USER = "fleetline-api"
RULES_USER = "fleetline-rules"
SERVICES = {user: secrets.token_urlsafe(16) for user in (INGEST_USER, API_USER, RULES_USER)}


def service_url(broker: LocalMosquitto, user: str = INGEST_USER) -> str:
    return f"mqtt://{user}:{SERVICES[user]}@127.0.0.1:{broker.port}"


@dataclass
class Backend:
    """What serve_stack started."""

    broker: LocalMosquitto
    ingest: IngestProcess
    api: ApiProcess
    db: asyncpg.Pool[Any]
    key: str
    database_url: str


@contextlib.asynccontextmanager
async def serve_stack(
    admin_url: str, tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory, name: str,
    api_env: dict[str, str] | None = None,
) -> AsyncIterator[Backend]:
    """A backend of its own: a database no other test's services serve (every API
    process runs the jobs and sends the cloud-to-device messages of its database,
    through its broker), the auth broker with a TLS listener on it, ingest and the API
    (``api_env`` added to its settings), and an admin key."""
    logs = tmp_path_factory.mktemp(f"{name}-services")
    async with migrated_database(admin_url, f"fleetline_{name}") as url:
        auth = BrokerAuth(database_url=url, key_secret=KEY_SECRET, services=SERVICES)
        with LocalMosquitto(tmp_path_factory.mktemp(f"{name}-mosquitto"), auth=auth,
                            tls=tls_files) as broker:
            ingest = IngestProcess(database_url=url, mqtt_url=service_url(broker),
                                   log_dir=logs, name=name)
            api = ApiProcess(database_url=url, mqtt_url=service_url(broker, API_USER),
                             log_dir=logs, name=name,
                             env={"FLEETLINE_API_DEVICE_MQTT_URL": broker.tls_url,
                                  **(api_env or {})})
            pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
            ingest.start()
            api.start()
            try:
                async with pool.acquire() as con:
                    key = (await apikeys.create_key(con, name=name, scopes=["admin"])).token
                yield Backend(broker, ingest, api, pool, key, url)
            finally:
                api.stop()
                ingest.stop()
                await pool.close()


def device_listener(tls_files: TlsFiles) -> dict[str, str]:
    """The API's settings for its devices' HTTPS listener, on a free port."""
    return {"FLEETLINE_API_DEVICE_PORT": str(free_port()),
            "FLEETLINE_API_DEVICE_TLS_CERT_FILE": str(tls_files.server_cert),
            "FLEETLINE_API_DEVICE_TLS_KEY_FILE": str(tls_files.server_key)}
