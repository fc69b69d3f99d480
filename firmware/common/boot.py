# Runs at power-on, before main.py. First the loader's part of firmware updates
# (fleetline_boot: a staged bundle swapped in, a version that did not come up rolled
# back), before any module of the application is imported; then join the network (the
# board layer's: Wi-Fi, or Ethernet on a Pyboard) and set the clock (SAS tokens and
# reading timestamps need it). Failures here are not fatal: main.py tries again.
import os


def _updating():
    for name in ("ota.json", "ota.json.tmp"):  # fleetline_boot.STATE_FILE and its save
        try:
            os.stat(name)
            return True
        except OSError:
            pass
    return False


# The loader only when an update left its state: otherwise its heap stays the
# application's (an ESP8266's is small).
if _updating():
    import fleetline_boot

    try:
        import esp32
    except ImportError:  # not an ESP32: no OTA partitions
        esp32 = None
    try:
        fleetline_boot.start(partitions=esp32)
    except Exception as exc:  # the application must still start
        print("boot: update step failed: " + repr(exc))  # noqa: T201 - the console is the log
    import sys

    del sys.modules["fleetline_boot"], fleetline_boot, esp32, sys
del _updating
import gc  # noqa: E402

gc.collect()

try:
    import board  # the application's own modules: after the swap
    import config_local as config

    board.connect_network(config)
    board.sync_clock(config)
except Exception as exc:  # main.py tries again (and resets the board if it cannot)
    print("boot: " + repr(exc))  # noqa: T201 - the console is the log
