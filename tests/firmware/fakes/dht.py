# A fake of MicroPython's `dht` (tests/firmware/test_board.py): a DHT22 that reads the
# values in the file `dht` ("21.5 40.0") of the folder FLEETLINE_FAKES names; without
# the file, a failed read (OSError), as a disconnected sensor gives.
import os

FOLDER = os.getenv("FLEETLINE_FAKES") or "."


class DHT22:
    def __init__(self, pin):
        self.pin = pin
        self.values = (0.0, 0.0)

    def measure(self):
        try:
            with open(FOLDER + "/dht") as f:
                t, h = f.read().split()
        except OSError:
            raise OSError(110) from None  # ETIMEDOUT, as the real driver
        self.values = (float(t), float(h))

    def temperature(self):
        return self.values[0]

    def humidity(self):
        return self.values[1]


DHT11 = DHT22
