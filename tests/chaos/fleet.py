"""The chaos suite's fleet, a child process of its own: the simulated devices of
fleetline_dev (each logged in with its own key over TLS), in four groups, each device
keeping its own log of the readings the broker acknowledged.

- ``direct``: devices registered with their keys; they go offline now and then and send
  their backlog when back, answer methods, twins and cloud-to-device messages, and take
  firmware rollouts;
- ``provisioned``: devices that get their key from an enrollment group themselves
  (``POST /v1/provision`` on the API's devices' listener), then behave as ``direct``;
- ``gateways``: gateways publishing for their children;
- ``alarm``: devices whose temperature is hot for HOT_TICKS readings in every
  PERIOD_TICKS (a rule raises an alarm for each hot spell and clears it after).

``python -m tests.chaos.fleet SPEC`` runs until SIGTERM, then writes the log to the file
the spec names: ``{device: [[ts, temperature, acked_at], ...]}`` (``acked_at`` in epoch
seconds), and the provisioning answers' status codes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from fleetline import devicekeys
from fleetline.settings import parse_mqtt_url
from fleetline_dev.simulated_gateways import run_gateways
from fleetline_dev.simulated_updates import UpdatePolicy
from fleetline_dev.simulator import OfflinePolicy, Reading, device_ids, run_fleet

# The alarm devices' temperature: hot (over the rule's threshold) for HOT_TICKS
# readings of every PERIOD_TICKS, normal otherwise.
HOT_TICKS = 8
PERIOD_TICKS = 24
HOT = 90.0
NORMAL = 20.0
PROVISION_ATTEMPTS = 20


class AlarmSensor:
    """Hot spells at fixed ticks: a device's readings say when its alarms should be."""

    def __init__(self, _rng: random.Random) -> None:
        self.tick = 0

    def read(self, fw: str) -> Reading:
        hot = self.tick % PERIOD_TICKS < HOT_TICKS
        self.tick += 1
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {"ts": now, "values": {"temperature": HOT if hot else NORMAL, "fw": fw}}


class Ledger:
    """Each device's acknowledged readings: (ts, temperature, when the ack came); how many
    readings were published (with re-sends) and how many of them were distinct; the
    devices' offline periods."""

    def __init__(self) -> None:
        self.acked_readings: dict[str, list[tuple[str, Any, float]]] = defaultdict(list)
        self.publishes = 0
        self.distinct: set[tuple[str, str]] = set()
        self.offline: list[tuple[str, float]] = []  # (device, seconds) of each period
        self.largest = 0  # readings in the largest batch acknowledged

    def published(self, device_id: str, readings: list[Reading]) -> None:
        self.publishes += len(readings)
        self.distinct.update((device_id, r["ts"]) for r in readings)

    def went_offline(self, device_id: str, seconds: float) -> None:
        self.offline.append((device_id, seconds))

    def acked(self, device_id: str, readings: list[Reading]) -> None:
        self.largest = max(self.largest, len(readings))
        now = time.time()
        for r in readings:
            self.acked_readings[device_id].append((r["ts"], r["values"].get("temperature"), now))


async def provision(spec: dict[str, Any], statuses: list[int]) -> dict[str, str]:
    """Each provisioned device asks for its key with a token of the group's key, retrying
    what the API could not answer then (a fault may be under way)."""
    keys: dict[str, str] = {}
    ids = device_ids(spec["provisioned"], spec["provisioned_prefix"])
    async with httpx.AsyncClient(verify=spec["ca_file"], timeout=10) as client:

        async def one(registration: str) -> None:
            key = devicekeys.registration_key(spec["group_key"], registration)
            for attempt in range(PROVISION_ATTEMPTS):
                url = spec["provision_urls"][attempt % len(spec["provision_urls"])]
                token = devicekeys.sas_token(key, registration, ttl_seconds=300)[0]
                try:
                    answer = await client.post(
                        f"{url}/v1/provision",
                        headers={"Authorization": f"SharedAccessSignature {token}"},
                        json={"enrollment_id": spec["enrollment"], "registration_id": registration},
                    )
                except httpx.HTTPError:
                    await asyncio.sleep(1)
                    continue
                statuses.append(answer.status_code)
                if answer.status_code == 200:
                    keys[registration] = answer.json()["auth"]["key"]
                    return
                await asyncio.sleep(float(answer.headers.get("Retry-After", 1)))
            raise RuntimeError(f"{registration} could not be provisioned")

        await asyncio.gather(*(one(r) for r in ids))
    return keys


async def run(spec: dict[str, Any], stop: asyncio.Event) -> None:
    ledger = Ledger()
    statuses: list[int] = []
    target = parse_mqtt_url(spec["mqtt_url"], ca_file=spec["ca_file"])
    interval = spec["interval_s"]
    seed = str(spec["seed"])
    offline = OfflinePolicy(spec["offline_probability"], tuple(spec["offline_seconds"]))
    updates = UpdatePolicy(release_key=bytes.fromhex(spec["release_key"]),
                           ca_file=Path(spec["ca_file"]), reboot_seconds=1.0)
    try:
        provisioned = await provision(spec, statuses)
        await asyncio.gather(
            run_fleet(target, devices=len(spec["direct_keys"]), interval_seconds=interval,
                      prefix=spec["direct_prefix"], stop=stop, keys=spec["direct_keys"],
                      updates=updates, offline=offline, reading_log=ledger, seed=seed),
            run_fleet(target, devices=len(provisioned), interval_seconds=interval,
                      prefix=spec["provisioned_prefix"], stop=stop, keys=provisioned,
                      offline=offline, reading_log=ledger, seed=seed),
            run_gateways(target, gateways=len(spec["gateway_keys"]), children=spec["children"],
                         interval_seconds=interval, prefix=spec["gateway_prefix"], stop=stop,
                         keys=spec["gateway_keys"], reading_log=ledger),
            run_fleet(target, devices=len(spec["alarm_keys"]), interval_seconds=1.0,
                      prefix=spec["alarm_prefix"], stop=stop, keys=spec["alarm_keys"],
                      reading_log=ledger, sensor=AlarmSensor),
        )
    finally:
        out = {"acked": ledger.acked_readings, "publishes": ledger.publishes,
               "published": len(ledger.distinct), "offline": ledger.offline,
               "largest_batch": ledger.largest, "provision_statuses": statuses}
        Path(spec["ledger"]).write_text(json.dumps(out))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s fleet %(levelname)s %(message)s")
    spec = json.loads(Path(sys.argv[1]).read_text())

    async def body() -> None:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(spec, stop)

    asyncio.run(body())


if __name__ == "__main__":
    main()
