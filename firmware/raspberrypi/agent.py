"""fleetline agent for a Raspberry Pi: the ESP32 firmware's device core under CPython.

The protocol (login, status, telemetry with backlog, twin, methods, cloud-to-device
messages, reconnection, token renewal) is ``fleetline_device`` from firmware/common, the
same file the ESP32 runs; the MQTT client is paho-mqtt behind umqtt.simple's API
(``umqtt_paho``). This file wires the Pi's hardware to it with gpiozero:

- a relay (``gpiozero.OutputDevice``) switched by the method ``switch`` (``{"on": true}``)
  and by the desired ``relay_on``, its state reported as ``relay_on``;
- telemetry: ``cpu_temp`` (``gpiozero.CPUTemperature``), ``button`` (a
  ``gpiozero.Button``, true while pressed), ``relay_on``, ``load1``, ``uptime_s``;
- the method ``reboot`` restarts the agent (systemd starts it again), not the Pi.

Settings come from the environment (``FLEETLINE_AGENT_*``, below), so a systemd unit can
keep the key in an ``EnvironmentFile`` only root reads. Run it with
``PYTHONPATH=firmware/common python firmware/raspberrypi/agent.py``; firmware/README.md
has the unit.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import fleetline_device
from umqtt_paho import MQTTClient

log = logging.getLogger("fleetline.agent")

MODEL = "raspberrypi"
CPU_TEMP_FILE = "/sys/class/thermal/thermal_zone0/temp"


class AgentConfigError(ValueError):
    pass


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise AgentConfigError(f"not a boolean: {value!r}")


def _pin(value: str) -> str | None:
    """A GPIO name gpiozero takes ("17", "GPIO17", "BOARD11"), or None when empty."""
    return value.strip() or None


class Settings:
    """``FLEETLINE_AGENT_*`` variables:

    - ``CONNECTION_STRING`` (what `fleetline device create` prints), or ``DEVICE_ID``,
      ``DEVICE_KEY``, ``MQTT_HOST``, ``MQTT_PORT`` (8883 with TLS, else 1883);
    - ``AUTH`` (``token`` or ``key``), ``TOKEN_TTL_S`` (3600), ``INTERVAL_S`` (10);
    - ``TLS`` (true: the broker verified against ``CA_FILE``, the system's CAs when
      empty; false: plain MQTT, the key or token in clear);
    - ``RELAY_PIN`` (17; empty: no relay), ``RELAY_ACTIVE_HIGH`` (true), ``BUTTON_PIN``
      (27; empty: no button), ``CPU_TEMP_FILE`` (the kernel's thermal zone 0).
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        def get(name: str, default: str = "") -> str:
            return env.get("FLEETLINE_AGENT_" + name, default)

        text = get("CONNECTION_STRING")
        if text:
            try:
                parts = fleetline_device.parse_connection_string(text)
            except ValueError as exc:
                raise AgentConfigError(str(exc)) from exc
            self.device_id = parts["DeviceId"]
            self.key = parts["SharedAccessKey"]
            self.host = parts["HostName"]
            port = parts.get("Port") or ""
        else:
            self.device_id = get("DEVICE_ID")
            self.key = get("DEVICE_KEY")
            self.host = get("MQTT_HOST")
            port = get("MQTT_PORT")
            missing = [n for n in ("DEVICE_ID", "DEVICE_KEY", "MQTT_HOST") if not get(n)]
            if missing:
                raise AgentConfigError(
                    "set FLEETLINE_AGENT_CONNECTION_STRING, or "
                    + ", ".join("FLEETLINE_AGENT_" + n for n in missing)
                )
        self.tls = _flag(get("TLS", "true"))
        try:
            self.port = int(port or (8883 if self.tls else 1883))
            self.interval_s = float(get("INTERVAL_S", "10"))
            self.token_ttl_s = int(get("TOKEN_TTL_S", str(fleetline_device.TOKEN_TTL_S)))
        except ValueError as exc:
            raise AgentConfigError(str(exc)) from exc
        self.auth = get("AUTH", "token")
        if self.auth not in ("token", "key"):
            raise AgentConfigError("FLEETLINE_AGENT_AUTH is token or key")
        self.ca_file = get("CA_FILE") or None
        self.relay_pin = _pin(get("RELAY_PIN", "17"))
        self.relay_active_high = _flag(get("RELAY_ACTIVE_HIGH", "true"))
        self.button_pin = _pin(get("BUTTON_PIN", "27"))
        self.cpu_temp_file = get("CPU_TEMP_FILE", CPU_TEMP_FILE)


class Agent:
    """The Pi's hardware bound to a :class:`fleetline_device.Device`.

    ``pin_factory``: gpiozero's pin factory (None: its default for the board; the tests
    pass ``gpiozero.pins.mock.MockFactory``). ``mqtt_client``: umqtt.simple's API."""

    def __init__(
        self,
        settings: Settings,
        *,
        pin_factory: Any = None,
        mqtt_client: Callable[..., Any] | None = None,
        backoff_min_s: float = fleetline_device.BACKOFF_MIN_S,
    ) -> None:
        # gpiozero is imported here: only this class needs it (and it probes the board).
        from gpiozero import Button, CPUTemperature, OutputDevice

        self.settings = settings
        self.restart_requested = False
        self.relay: Any = None
        self.button: Any = None
        self.cpu: Any = None
        if settings.relay_pin is not None:
            self.relay = OutputDevice(
                settings.relay_pin,
                active_high=settings.relay_active_high,
                initial_value=False,
                pin_factory=pin_factory,
            )
        if settings.button_pin is not None:
            self.button = Button(settings.button_pin, pin_factory=pin_factory)
        if os.path.exists(settings.cpu_temp_file):
            self.cpu = CPUTemperature(sensor_file=settings.cpu_temp_file, pin_factory=pin_factory)
        self.started = time.monotonic()
        self.device = fleetline_device.Device(
            settings.device_id,
            settings.key,
            settings.host,
            settings.port,
            mqtt_client=mqtt_client or self._mqtt_client,
            read_sensors=self.read_sensors,
            interval_s=settings.interval_s,
            auth=settings.auth,
            token_ttl_s=settings.token_ttl_s,
            backoff_min_s=backoff_min_s,
            reboot=self._restart,
            reported={"fw": fleetline_device.VERSION, "model": MODEL, "platform": "linux"},
            log=log.info,
        )
        if self.relay is not None:
            fleetline_device.add_switch(self.device, self._set_relay, self._relay_on)

    def _mqtt_client(self, *args: Any) -> MQTTClient:
        context = None
        if self.settings.tls:
            context = ssl.create_default_context(cafile=self.settings.ca_file)
        return MQTTClient(*args, ssl_context=context)

    def _set_relay(self, on: bool) -> None:
        self.relay.value = on

    def _relay_on(self) -> bool:
        return bool(self.relay.value)

    def _restart(self) -> None:
        """The method ``reboot``: leave cleanly; systemd (Restart=always) starts us again."""
        self.restart_requested = True
        self.device.stop()

    def read_sensors(self) -> dict[str, Any]:
        values: dict[str, Any] = {"uptime_s": round(time.monotonic() - self.started)}
        if self.cpu is not None:
            values["cpu_temp"] = round(self.cpu.temperature, 1)
        if self.button is not None:
            values["button"] = bool(self.button.is_pressed)
        if self.relay is not None:
            values["relay_on"] = self._relay_on()
        if hasattr(os, "getloadavg"):
            values["load1"] = round(os.getloadavg()[0], 2)
        return values

    def run(self) -> None:
        self.device.run()

    def stop(self) -> None:
        self.device.stop()

    def close(self) -> None:
        for part in (self.relay, self.button, self.cpu):
            if part is not None:
                part.close()


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("FLEETLINE_AGENT_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(message)s",
    )
    try:
        agent = Agent(Settings(os.environ))
    except AgentConfigError as exc:
        log.error("configuration: %s", exc)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    log.info("fleetline agent %s as %s", fleetline_device.VERSION, agent.settings.device_id)
    try:
        agent.run()
    finally:
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
