"""A secure broker (TLS, the auth plugin) and an API connected to it with a service
account, on a database of their own: for the tests of X.509 identities, provisioning,
limits, transfers and uploads.

Their own database, not the session's: an API process runs the jobs and sends the
cloud-to-device messages of every device in its database, and this API's broker is not
the one the session's devices are on (a job of the session's devices, run by this API,
reached none of them)."""

from __future__ import annotations

import secrets
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fleetline import apikeys
from fleetline_dev.certs import TlsFiles, cert_pem, key_pem
from fleetline_dev.embedded import BrokerAuth, LocalMosquitto
from tests.conftest import migrated_database
from tests.stack import device_listener
from tests.support import DEVICE_KEY_SECRET, ApiProcess

API_PASSWORD = secrets.token_urlsafe(16)
Identity = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


@pytest.fixture(scope="session")
async def secure_database_url(admin_url: str) -> AsyncIterator[str]:
    async with migrated_database(admin_url, "fleetline_secure") as url:
        yield url


@pytest.fixture(scope="session")
async def secure_db(secure_database_url: str) -> AsyncIterator[asyncpg.Pool[Any]]:
    pool = await asyncpg.create_pool(secure_database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def secure_key(secure_db: asyncpg.Pool[Any]) -> Callable[..., Any]:
    """An API key of the secure API with the given scopes."""

    async def make(*scopes: str) -> str:
        async with secure_db.acquire() as con:
            return (await apikeys.create_key(con, name="test", scopes=list(scopes))).token

    return make


@pytest.fixture(scope="session")
def secure_broker(
    secure_database_url: str, tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalMosquitto]:
    auth = BrokerAuth(database_url=secure_database_url, key_secret=DEVICE_KEY_SECRET.encode(),
                      services={"api": API_PASSWORD}, cache_seconds=1)
    with LocalMosquitto(tmp_path_factory.mktemp("mosquitto-secure"), auth=auth,
                        tls=tls_files) as server:
        yield server


@pytest.fixture(scope="session")
def secure_api(secure_database_url: str, secure_broker: LocalMosquitto, artifacts: Path,
               tls_files: TlsFiles) -> Iterator[ApiProcess]:
    """The API on the secure broker, with the devices' HTTPS listener (``device_url``);
    provisioning allows 5 registrations per enrollment at once, then one a second, and 20
    failed attempts per address."""
    listener = device_listener(tls_files)
    proc = ApiProcess(
        database_url=secure_database_url,
        mqtt_url=f"mqtt://api:{API_PASSWORD}@127.0.0.1:{secure_broker.port}",
        log_dir=artifacts, name="secure",
        env={"FLEETLINE_API_DEVICE_MQTT_URL": secure_broker.tls_url,
             "FLEETLINE_API_PROVISION_RATE": "1", "FLEETLINE_API_PROVISION_BURST": "5",
             "FLEETLINE_API_PROVISION_FAILURES_BURST": "20",
             "FLEETLINE_API_UPLOAD_SWEEP_S": "0.5", **listener},
    )
    proc.device_url = f"https://127.0.0.1:{listener['FLEETLINE_API_DEVICE_PORT']}"
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
async def rest(secure_api: ApiProcess, secure_key: Callable[..., Any]
               ) -> AsyncIterator[httpx.Client]:
    """A REST client of the secure API with a devices:read and devices:write key."""
    with httpx.Client(base_url=secure_api.url, timeout=10, headers={
            "Authorization": f"Bearer {await secure_key('devices:write', 'devices:read')}"}) as c:
        yield c


@pytest.fixture
def tls_for(tls_files: TlsFiles, tmp_path: Path) -> Callable[..., ssl.SSLContext]:
    """A client TLS context that verifies the broker, presenting ``identity`` if given."""

    def make(identity: Identity | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(tls_files.ca_cert))
        if identity is not None:
            cert, key = identity
            name = f"identity-{len(list(tmp_path.glob('identity-*')))}"
            (tmp_path / f"{name}.crt").write_bytes(cert_pem(cert))
            (tmp_path / f"{name}.key").write_bytes(key_pem(key))
            context.load_cert_chain(tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
        return context

    return make
