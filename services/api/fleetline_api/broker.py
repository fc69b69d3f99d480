"""The API's own connection to the broker, kept up in the background.

``/readyz`` reports it; the API publishes cloud-to-device traffic through it. The API
connects with its own service account (the credentials in ``FLEETLINE_MQTT_URL``) and a
clean session: it holds no subscriptions that must survive it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import aiomqtt

from fleetline import mqtt
from fleetline.settings import MqttProtocol
from fleetline_api.settings import ApiSettings

log = logging.getLogger(__name__)

# After refused credentials, retry this rarely: an operator has to fix them.
AUTH_RETRY_SECONDS = 30.0


class BrokerLink:
    def __init__(self, settings: ApiSettings) -> None:
        self._settings = settings
        self.client: aiomqtt.Client | None = None
        self.identifier = f"fleetline-api-{socket.gethostname()}-{os.getpid()}"

    @property
    def connected(self) -> bool:
        return self.client is not None

    def _make(self, protocol: MqttProtocol) -> aiomqtt.Client:
        return mqtt.make_client(
            self._settings.mqtt,
            identifier=self.identifier,
            protocol=protocol,
            persistent=False,
        )

    async def run(self) -> None:
        """Stay connected until cancelled."""
        attempt = 0
        while True:
            try:
                async with mqtt.connected(self._make, self._settings.mqtt_protocol) as client:
                    self.client = client
                    attempt = 0
                    log.info("connected to the broker as %s", self.identifier)
                    await mqtt.wait_disconnected(client)
            except mqtt.MqttAuthError as exc:
                log.error("the broker refused the API's credentials: %s", exc)
                self.client = None
                await asyncio.sleep(AUTH_RETRY_SECONDS)
                continue
            except aiomqtt.MqttError as exc:
                log.warning("broker connection lost: %s", exc)
            finally:
                self.client = None
            await asyncio.sleep(mqtt.backoff_seconds(attempt))
            attempt += 1
