"""Run by the MicroPython unix port, not by CPython (tests/firmware/test_gateway.py).

Reads each advert of the file ``sys.argv[1]`` (a JSON list of advertising data in hex;
a file, as the unix port does not start with a long argument) with
firmware/common/fleetline_bthome.py and prints one JSON line per advert: whether it
carries BTHome data (the quick test), its service data (hex), its name, and what
``decode`` made of it (with ``units``: what ``units(unit_mask(...))`` gave), or the
error each step raised.

    micropython drive_bthome.py adverts.json
"""

import binascii
import json
import sys

import fleetline_bthome


def read(adv: bytes) -> dict:
    out = {"carries": fleetline_bthome.carries_service_data(adv), "name": None}
    try:
        out["name"] = fleetline_bthome.name(memoryview(adv))
        data = fleetline_bthome.service_data(memoryview(adv))
    except ValueError as exc:
        out["error"] = "ad: " + str(exc)
        return out
    if data is None:
        out["data"] = None
        return out
    out["data"] = binascii.hexlify(data).decode()
    try:
        values, unknown = fleetline_bthome.decode(data)
    except ValueError as exc:
        out["error"] = "decode: " + str(exc)
        return out
    out["values"] = values
    out["unknown"] = unknown
    out["units"] = fleetline_bthome.units(fleetline_bthome.unit_mask(data))
    return out


with open(sys.argv[1]) as f:
    adverts = json.load(f)
for advert in adverts:
    print(json.dumps(read(binascii.unhexlify(advert))))  # noqa: T201 - the test reads stdout
