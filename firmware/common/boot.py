# Runs at power-on, before main.py. First the loader's part of firmware updates
# (fleetline_boot: a staged bundle swapped in, a version that did not come up rolled
# back), before any module of the application is imported; then join the network (the
# board layer's: Wi-Fi, or Ethernet on a Pyboard) and set the clock (SAS tokens and
# reading timestamps need it). Failures here are not fatal: main.py tries again.
import fleetline_boot

try:
    import esp32
except ImportError:  # not an ESP32: no OTA partitions
    esp32 = None
try:
    fleetline_boot.start(partitions=esp32)
except Exception as exc:  # the application must still start
    print("boot: update step failed: " + repr(exc))  # noqa: T201 - the console is the log
# Its heap back for the application (fleetline_ota imports it again when it updates).
import gc  # noqa: E402
import sys  # noqa: E402

del sys.modules["fleetline_boot"], fleetline_boot, esp32
gc.collect()

try:
    import board  # the application's own modules: after the swap
    import config_local as config

    board.connect_network(config)
    board.sync_clock(config)
except Exception as exc:  # main.py tries again (and resets the board if it cannot)
    print("boot: " + repr(exc))  # noqa: T201 - the console is the log
