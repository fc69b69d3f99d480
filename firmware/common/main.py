# fleetline reference firmware for MicroPython boards (ESP32, ESP8266, Pyboard): telemetry,
# twin, direct methods and cloud-to-device messages over MQTT (firmware/README.md). The
# protocol lives in fleetline_device.py, the board's hardware in board.py (the board
# layer `fleetline firmware build --board` puts there); this file wires the two.
import board
import config_local as config
import fleetline_device
import machine
from umqtt.simple import MQTTClient


def main():
    watchdog_s = getattr(config, "WATCHDOG_S", 0)
    wdt = machine.WDT(timeout=watchdog_s * 1000) if watchdog_s else None
    feed = board.Feeder(wdt).feed
    make_client = board.mqtt_client_factory(MQTTClient, config)
    # With ENROLLMENT, the first boot provisions the device (then kept in flash).
    device_id, key, host, port, auth = board.credentials(config, make_client, feed)
    device = fleetline_device.Device(
        device_id,
        key,
        host,
        port,
        mqtt_client=make_client,
        read_sensors=board.Sensors(config).read,
        interval_s=getattr(config, "INTERVAL_S", 10),
        auth=auth,
        token_ttl_s=getattr(config, "TOKEN_TTL_S", fleetline_device.TOKEN_TTL_S),
        on_c2d=board.show_message,
        reboot=machine.reset,
        sync_clock=lambda: board.sync_clock(config),
        feed=feed,
        reported={
            "fw": fleetline_device.VERSION,
            "model": board.model(),
            "platform": board.PLATFORM,
        },
        log=board.log,
        # Readings taken offline, kept in flash across a reset ("" to keep them in RAM only).
        backlog_file=getattr(config, "BACKLOG_FILE", "backlog.jsonl"),
    )
    relay_pin = getattr(config, "RELAY_PIN", None)
    if relay_pin is not None:
        relay = board.Relay(relay_pin, getattr(config, "RELAY_ACTIVE_HIGH", True))
        fleetline_device.add_switch(device, relay.set, relay.is_on)
    device.run()


try:
    main()
except Exception as exc:  # noqa: BLE001 - whatever stopped it, the board must come back
    # Not a tight loop: the console says why, and the board starts again after a pause.
    board.log("main: " + repr(exc) + "; resetting in 10 s")
    import time

    time.sleep(10)
    machine.reset()
