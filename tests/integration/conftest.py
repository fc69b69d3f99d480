"""A secure broker (TLS, the auth plugin) and an API connected to it with a service
account: for the tests of X.509 identities and provisioning."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetline_dev.certs import TlsFiles
from fleetline_dev.embedded import BrokerAuth, LocalMosquitto
from tests.support import DEVICE_KEY_SECRET, ApiProcess

API_PASSWORD = secrets.token_urlsafe(16)


@pytest.fixture(scope="session")
def secure_broker(
    database_url: str, tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalMosquitto]:
    auth = BrokerAuth(database_url=database_url, key_secret=DEVICE_KEY_SECRET.encode(),
                      services={"api": API_PASSWORD}, cache_seconds=1)
    with LocalMosquitto(tmp_path_factory.mktemp("mosquitto-secure"), auth=auth,
                        tls=tls_files) as server:
        yield server


@pytest.fixture(scope="session")
def secure_api(database_url: str, secure_broker: LocalMosquitto, artifacts: Path
               ) -> Iterator[ApiProcess]:
    """The API on the secure broker; provisioning allows 5 registrations per enrollment
    at once, then one a second."""
    proc = ApiProcess(
        database_url=database_url,
        mqtt_url=f"mqtt://api:{API_PASSWORD}@127.0.0.1:{secure_broker.port}",
        log_dir=artifacts, name="secure",
        env={"FLEETLINE_API_DEVICE_MQTT_URL": secure_broker.tls_url,
             "FLEETLINE_API_PROVISION_RATE": "1", "FLEETLINE_API_PROVISION_BURST": "5"},
    )
    proc.start()
    yield proc
    proc.stop()
