# fleetline reference firmware for MicroPython boards (ESP32, ESP8266, Pyboard): telemetry,
# twin, direct methods, cloud-to-device messages and firmware updates over MQTT
# (firmware/README.md). The protocol lives in fleetline_device.py, the board's hardware in
# board.py (the board layer `fleetline firmware build --board` puts there); this file
# wires the two; with GATEWAY = True in the config the board is also a BLE gateway
# (fleetline_gateway.py: the sensors it hears are its children). Everything, the imports
# too, runs under the guard at the end: a module that fails to load (a broken update)
# resets the board, and the loader counts the boot.
import machine


def main():
    import board
    import config_local as config
    import fleetline_board
    import fleetline_device
    from umqtt.simple import MQTTClient

    try:
        from fleetline_version import VERSION  # `fleetline firmware build --version`
    except ImportError:
        VERSION = fleetline_device.VERSION

    watchdog_s = getattr(config, "WATCHDOG_S", 0)
    wdt = machine.WDT(timeout=watchdog_s * 1000) if watchdog_s else None
    feed = board.Feeder(wdt).feed
    make_client = board.mqtt_client_factory(MQTTClient, config)
    # With ENROLLMENT, the first boot provisions the device (then kept in flash).
    device_id, key, host, port, auth = board.credentials(config, make_client, feed)
    read_sensors = board.Sensors(config).read
    gateway = None
    if getattr(config, "GATEWAY", False):
        import fleetline_gateway

        gateway = fleetline_gateway.from_config(config, log=board.log)
        read_sensors = gateway.sensors(read_sensors)  # the board's and the gateway's
    device = fleetline_device.Device(
        device_id,
        key,
        host,
        port,
        mqtt_client=make_client,
        read_sensors=read_sensors,
        interval_s=getattr(config, "INTERVAL_S", 10),
        auth=auth,
        token_ttl_s=getattr(config, "TOKEN_TTL_S", fleetline_device.TOKEN_TTL_S),
        on_c2d=board.show_message,
        reboot=machine.reset,
        sync_clock=lambda: board.sync_clock(config),
        feed=feed,
        reported={
            "fw": VERSION,
            "model": board.model(),
            "platform": board.PLATFORM,
            "units": fleetline_board.units(config),
        },
        log=board.log,
        # Readings taken offline, kept in flash across a reset ("" to keep them in RAM only).
        backlog_file=getattr(config, "BACKLOG_FILE", "backlog.jsonl"),
    )
    # Firmware updates (with RELEASE_KEY in the config) and file uploads (docs/ota.md).
    if getattr(config, "TRANSFERS", board.TRANSFERS):
        import fleetline_transfers

        fleetline_transfers.start(device, config, VERSION, board.PLATFORM)
    relay_pin = getattr(config, "RELAY_PIN", None)
    if relay_pin is not None:
        relay = board.Relay(relay_pin, getattr(config, "RELAY_ACTIVE_HIGH", True))
        fleetline_device.add_switch(device, relay.set, relay.is_on)
    if gateway is not None:
        gateway.run(device)  # the device's loop and the BLE scans, in one asyncio loop
    else:
        device.run()


def crash_reset_s():
    try:
        import config_local as config

        return getattr(config, "CRASH_RESET_S", 10)
    except Exception:  # noqa: BLE001 - no settings: the default
        return 10


try:
    main()
except Exception as exc:  # noqa: BLE001 - whatever stopped it, the board must come back
    # Not a tight loop: the console says why, and the board starts again after a pause.
    delay = crash_reset_s()
    print("main: " + repr(exc) + "; resetting in " + str(delay) + " s")  # noqa: T201
    import time

    time.sleep(delay)
    machine.reset()
