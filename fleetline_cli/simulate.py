"""``fleetline simulate``: the simulated fleet of ``fleetline up`` against any deployment.

Its devices are registered over the REST API (FLEETLINE_API_URL, FLEETLINE_API_KEY with
``devices:write``), each with its own key (a device of the prefix registered already is
issued a new one), and connect to the broker the API names for devices
(``GET /v1/endpoints``; FLEETLINE_DEVICE_MQTT_URL or --mqtt-url instead), over TLS when
its URL is ``mqtts://``, verifying it against the CA file given (else the system's CAs).
The devices themselves are fleetline_dev/simulator.py's: readings, twin, methods and
cloud-to-device messages, as under ``fleetline up``.

Gateways (``--gateways``) are fleetline_dev/simulated_gateways.py's, as under ``fleetline
up --gateways``: each registered over the API as a gateway that creates its children on
their first message (ids ``{gateway}-c000``...), with its limits scaled for them, and
publishing for them on the broker.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

from fleetline import limits
from fleetline.settings import MqttTarget, parse_mqtt_url
from fleetline_cli.client import ApiClient, ApiError
from fleetline_dev import simulated_gateways
from fleetline_dev.simulated_gateways import run_devices_and_gateways

TAGS = {"source": "simulator"}


class NotSimulatedError(ApiError):
    """A device of the prefix exists and is not one of the simulator's."""


def _register_one(
    client: ApiClient, device_id: str, tags: dict[str, str], gateway: dict[str, Any] | None
) -> str:
    """Register the device (with ``tags``, and as a gateway with that policy), or issue
    a new key to one that exists and carries those tags (a real device of the same
    prefix is left alone: a new key would lock it out); its key."""
    body: dict[str, Any] = {"id": device_id, "tags": tags, "gateway": gateway}
    try:
        return str(client.request("POST", "/v1/devices", json=body)["credentials"]["key"])
    except ApiError as exc:
        if exc.status != 409:
            raise
    device = client.request("GET", f"/v1/devices/{device_id}")
    if any(device["tags"].get(name) != value for name, value in tags.items()):
        tagged = " ".join(f"{k}={v}" for k, v in tags.items())
        raise NotSimulatedError(
            f"device {device_id} exists and is not a simulated one (no tag {tagged}): "
            "choose another --prefix"
        ) from None
    if gateway is not None and device.get("gateway") is None:
        client.request("PATCH", f"/v1/devices/{device_id}", json={"gateway": gateway})
    return str(client.request("POST", f"/v1/devices/{device_id}/key")["key"])


def register(client: ApiClient, ids: list[str]) -> dict[str, str]:
    """Register each device (tagged source=simulator), or issue a new key to a simulated
    one that exists; each device's key."""
    return {device_id: _register_one(client, device_id, TAGS, None) for device_id in ids}


def register_gateways(client: ApiClient, ids: list[str], *, children: int) -> dict[str, str]:
    """Register each gateway (tagged as simulated_gateways.py tags them) with a policy
    that creates its children on their first message, or issue a new key to a simulated
    gateway that exists (one that is no gateway yet is made one). Its publishes for its
    children count against its own limits: it gets the default limits times
    ``children + 1``, as its override (a larger override already there is kept). Each
    gateway's key."""
    if not ids:
        return {}
    default = next(
        (x for x in client.request("GET", "/v1/limits")["items"] if x["selector"] == "default"),
        None,
    )
    keys: dict[str, str] = {}
    for gateway_id in ids:
        keys[gateway_id] = _register_one(
            client,
            gateway_id,
            simulated_gateways.TAGS,
            simulated_gateways.policy(gateway_id, children),
        )
        if default is not None:
            _scale_limits(client, gateway_id, default, children + 1)
    return keys


def _scale_limits(client: ApiClient, device_id: str, default: dict[str, Any], times: int) -> None:
    current = client.request("GET", f"/v1/devices/{device_id}/limits")["limits"]
    own = current if current and current["selector"] == f"device:{device_id}" else None
    wanted = limits.scaled(default, times, own)
    if own is None or any(wanted[name] != own[name] for name in limits.MOST):
        client.request("PUT", f"/v1/limits/devices/{device_id}", json=wanted)


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
    gateways: int,
    children_per_gateway: int,
    gateway_prefix: str,
) -> None:
    """The fleet (and its gateways, with their children) until SIGINT or SIGTERM (or
    ``duration_seconds``, when not 0): then each device says offline and disconnects."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if duration_seconds > 0:
        loop.call_later(duration_seconds, stop.set)
    try:
        await run_devices_and_gateways(
            target,
            devices=devices,
            gateways=gateways,
            children_per_gateway=children_per_gateway,
            interval_seconds=interval_seconds,
            stop=stop,
            keys=keys,
            prefix=prefix,
            gateway_prefix=gateway_prefix,
        )
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
