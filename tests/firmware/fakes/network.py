# A fake of MicroPython's `network` (tests/firmware/test_board.py): the Wi-Fi (and the
# Pyboard's Ethernet) is up unless the file `wifi_down` exists in the folder
# FLEETLINE_FAKES names.
import os

STA_IF = 0
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
FOLDER = os.getenv("FLEETLINE_FAKES") or "."


def _down():
    try:
        os.stat(FOLDER + "/wifi_down")
        return True
    except OSError:
        return False


class WLAN:
    def __init__(self, interface=STA_IF):
        self.interface = interface

    def active(self, on=None):
        return True

    def isconnected(self):
        return not _down()

    def connect(self, ssid, password):
        pass

    def ifconfig(self):
        return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")

    def status(self, what=None):
        if what is None:  # the link's state
            return STAT_CONNECTING if _down() else STAT_GOT_IP
        if _down():  # status("rssi") needs a link
            raise OSError("not connected")
        return -50


class WIZNET5K:
    """The Pyboard's Ethernet module: up unless `wifi_down` exists (one switch for both)."""

    def __init__(self, spi, cs, rst):
        self.spi = spi

    def isconnected(self):
        return not _down()

    def ifconfig(self):
        return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")
