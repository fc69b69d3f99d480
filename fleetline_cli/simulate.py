"""``fleetline simulate``: the simulated fleet of ``fleetline up`` against any deployment.

Its devices are registered over the REST API (FLEETLINE_API_URL, FLEETLINE_API_KEY with
``devices:write``), each with its own key (a device of the prefix registered already is
issued a new one), and connect to the broker the API names for devices
(``GET /v1/endpoints``; FLEETLINE_DEVICE_MQTT_URL or --mqtt-url instead), over TLS when
its URL is ``mqtts://``, verifying it against the CA file given (else the system's CAs).
The devices themselves are fleetline_dev/simulator.py's: readings, twin, methods and
cloud-to-device messages, as under ``fleetline up``.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from fleetline.settings import MqttTarget, parse_mqtt_url
from fleetline_cli.client import ApiClient, ApiError
from fleetline_dev.simulator import run_fleet

TAGS = {"source": "simulator"}


class NotSimulatedError(ApiError):
    """A device of the prefix exists and is not one of the simulator's."""


def register(client: ApiClient, ids: list[str]) -> dict[str, str]:
    """Register each device (tagged source=simulator), or issue a new key to one that
    exists and carries that tag (a real device of the same prefix is left alone: a new
    key would lock it out); each device's key."""
    keys: dict[str, str] = {}
    for device_id in ids:
        try:
            made = client.request("POST", "/v1/devices", json={"id": device_id, "tags": TAGS})
            credentials = made["credentials"]
        except ApiError as exc:
            if exc.status != 409:
                raise
            tags = client.request("GET", f"/v1/devices/{device_id}")["tags"]
            if any(tags.get(name) != value for name, value in TAGS.items()):
                raise NotSimulatedError(
                    f"device {device_id} exists and is not a simulated one (no tag "
                    "source=simulator): choose another --prefix"
                ) from None
            credentials = client.request("POST", f"/v1/devices/{device_id}/key")
        keys[device_id] = credentials["key"]
    return keys


def broker(client: ApiClient, mqtt_url: str | None, ca_file: Path | None) -> MqttTarget:
    """Where the devices connect: ``mqtt_url``, else the API's device endpoint."""
    url = mqtt_url or str(client.request("GET", "/v1/endpoints")["device_mqtt_url"])
    return parse_mqtt_url(url, ca_file=str(ca_file) if ca_file else None)


async def run(
    target: MqttTarget,
    keys: dict[str, str],
    *,
    devices: int,
    interval_seconds: float,
    prefix: str,
    duration_seconds: float,
) -> None:
    """The fleet until SIGINT or SIGTERM (or ``duration_seconds``, when not 0): then each
    device says offline and disconnects."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if duration_seconds > 0:
        loop.call_later(duration_seconds, stop.set)
    try:
        await run_fleet(
            target,
            devices=devices,
            interval_seconds=interval_seconds,
            prefix=prefix,
            stop=stop,
            keys=keys,
        )
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
