"""BTHome v2 advertisements (the open BLE sensor format, bthome.io): what a gateway
(fleetline_gateway) reads from a sensor's advertising data.

A BTHome v2 sensor advertises an AD structure "Service Data - 16-bit UUID" (type 0x16)
for the UUID 0xFCD2: a device information byte (bit 0: encrypted; bit 2: trigger based;
bits 5-7: the version, 2), then objects, each an object id and a little-endian value of
the size the id implies. Only unencrypted adverts are read here (an encrypted one needs
the sensor's key). An object id not in ``_OBJECTS`` has a size this module does not
know, so the advert is read up to it and no further.

MicroPython and CPython alike: no allocation beyond the values decoded, no exception
but ValueError for anything malformed.
"""

UUID = 0xFCD2
_AD_SERVICE_DATA_16 = 0x16
_AD_NAME_SHORT = 0x08
_AD_NAME_COMPLETE = 0x09

# The objects read here, 4 bytes each: the object id; its size in bytes, plus 0x80 when it
# is signed; its scale, the power of ten its raw value is divided by (0xFF: a boolean);
# its metric's place in _UNITS (0xFF: no unit: booleans, counts, the packet id, buttons).
# _NAMES holds their names in the same order; a name given by two ids (a coarser
# resolution) is the same metric, with the same place in _UNITS. Bytes and tuples, not a
# dict of tuples: a few hundred bytes of heap instead of a few KB.
_OBJECTS = (
    b"\x00\x01\x00\xff"  # packet id
    b"\x01\x01\x00\x00"  # battery, %
    b"\x02\x82\x02\x01"  # temperature, degrees Celsius
    b"\x03\x02\x02\x02"  # humidity, %
    b"\x04\x03\x02\x03"  # pressure, hPa
    b"\x05\x03\x02\x04"  # illuminance, lux
    b"\x08\x82\x02\x05"  # dew point, degrees Celsius
    b"\x09\x01\x00\xff"  # count
    b"\x0a\x03\x03\x06"  # energy, kWh
    b"\x0b\x03\x02\x07"  # power, W
    b"\x0c\x02\x03\x08"  # voltage, V
    b"\x0d\x02\x00\x09"  # PM2.5, ug/m3
    b"\x0e\x02\x00\x0a"  # PM10, ug/m3
    b"\x0f\x01\xff\xff"  # generic boolean
    b"\x10\x01\xff\xff"  # power on
    b"\x11\x01\xff\xff"  # opening
    b"\x12\x02\x00\x0b"  # CO2, ppm
    b"\x13\x02\x00\x0c"  # TVOC, ug/m3
    b"\x14\x02\x02\x0d"  # moisture, %
    b"\x15\x01\xff\xff"  # battery low
    b"\x1a\x01\xff\xff"  # door
    b"\x21\x01\xff\xff"  # motion
    b"\x23\x01\xff\xff"  # occupancy
    b"\x2d\x01\xff\xff"  # window
    b"\x2e\x01\x00\x02"  # humidity, %
    b"\x2f\x01\x00\x0d"  # moisture, %
    b"\x3a\x01\x00\xff"  # button event: 0 none, 1 press, 2 double press...
    b"\x3d\x02\x00\xff"  # count
    b"\x3e\x04\x00\xff"  # count
    b"\x3f\x82\x01\x0e"  # rotation, degrees
    b"\x40\x02\x00\x0f"  # distance, mm
    b"\x43\x02\x03\x10"  # current, A
    b"\x45\x82\x01\x01"  # temperature, degrees Celsius
    b"\x4a\x02\x01\x08"  # voltage, V
)
_NAMES = (
    "packet_id", "battery", "temperature", "humidity", "pressure", "illuminance",
    "dewpoint", "count", "energy", "power", "voltage", "pm2_5", "pm10", "generic",
    "power_on", "opening", "co2", "tvoc", "moisture", "battery_low", "door", "motion",
    "occupancy", "window", "humidity", "moisture", "button", "count", "count", "rotation",
    "distance", "current", "temperature", "voltage",
)
# The unit of each metric that has one (a twin's reported ``units``), by its place: also
# its bit in a mask of metrics (unit_mask): 17 bits, a small int on any board.
_UNITS = (
    "%", "°C", "%", "hPa", "lx", "°C", "kWh", "W", "V", "µg/m³", "µg/m³", "ppm", "µg/m³",
    "%", "°", "mm", "A",
)
_DIVISORS = (1, 10, 100, 1000)


def _find(object_id: int) -> int:
    """The position of ``object_id`` in _OBJECTS, or -1."""
    for at in range(0, len(_OBJECTS), 4):
        if _OBJECTS[at] == object_id:
            return at
    return -1


def service_data(adv: object) -> object:
    """The BTHome service data in advertising data ``adv`` (bytes or a memoryview of
    them): what follows the UUID, as a memoryview of ``adv`` (no copy), or None when
    the advert carries none. ValueError when the AD structures are malformed (a length
    running past the end) before it is found."""
    view = memoryview(adv)
    end = len(view)
    i = 0
    while i < end:
        size = view[i]
        if size == 0:  # padding: the rest is unused
            return None
        if i + 1 + size > end:
            raise ValueError("an AD structure runs past the end")
        if size >= 3 and view[i + 1] == _AD_SERVICE_DATA_16 and view[i + 2] == 0xD2 \
                and view[i + 3] == 0xFC:
            return view[i + 4 : i + 1 + size]
        i += 1 + size
    return None


def carries_service_data(adv: object) -> bool:
    """Whether advertising data ``adv`` holds a BTHome service data structure (whole or
    not): a quick test in the BLE event handler, before anything is allocated."""
    end = len(adv)
    i = 0
    while i + 3 < end:
        size = adv[i]
        if size == 0:
            return False
        if size >= 3 and adv[i + 1] == _AD_SERVICE_DATA_16 and adv[i + 2] == 0xD2 \
                and adv[i + 3] == 0xFC:
            return True
        i += 1 + size
    return False


def name(adv: object) -> object:
    """The advertised local name (complete or shortened) as str, or None. Malformed
    structures and bytes that are not UTF-8 give None."""
    view = memoryview(adv)
    end = len(view)
    i = 0
    while i + 1 < end:
        size = view[i]
        if size == 0 or i + 1 + size > end:
            return None
        if view[i + 1] in (_AD_NAME_COMPLETE, _AD_NAME_SHORT):
            try:
                return str(bytes(view[i + 2 : i + 1 + size]), "utf-8")
            except (UnicodeError, ValueError):
                return None
        i += 1 + size
    return None


def decode(data: object) -> tuple:
    """BTHome v2 service data (after the UUID) → ``(values, unknown)``: ``values`` the
    measurements by name (numbers; booleans for the binary objects) including
    ``packet_id`` when sent; ``unknown`` the first object id this module does not know
    (the objects after it are not read), or None when all were read. ValueError: not
    version 2, encrypted, or an object cut short."""
    view = memoryview(data)
    end = len(view)
    if end < 1:
        raise ValueError("no device information")
    info = view[0]
    if info >> 5 != 2:
        raise ValueError("not BTHome v2")
    if info & 1:
        raise ValueError("encrypted")
    values = {}
    i = 1
    while i < end:
        object_id = view[i]
        at = _find(object_id)
        if at < 0:
            return values, object_id
        size = _OBJECTS[at + 1] & 0x7F
        if i + 1 + size > end:
            raise ValueError("object " + hex(object_id) + " cut short")
        raw = 0
        for k in range(size):  # little-endian
            raw |= view[i + 1 + k] << (8 * k)
        if _OBJECTS[at + 1] & 0x80 and raw >= 1 << (8 * size - 1):
            raw -= 1 << (8 * size)
        scale = _OBJECTS[at + 2]
        name = _NAMES[at // 4]
        if scale == 0xFF:
            values[name] = raw != 0
        elif scale == 0:
            values[name] = raw
        else:
            # Divided, not multiplied: 2137 / 100 is the float nearest 21.37.
            values[name] = raw / _DIVISORS[scale]
        i += 1 + size
    return values, None


def unit_mask(data: object) -> int:
    """The metrics with a unit in BTHome v2 service data ``data`` (as ``decode`` reads
    it, up to the first object unknown here): one bit each, its place in _UNITS. No
    allocation; 0 for data ``decode`` refuses."""
    view = memoryview(data)
    end = len(view)
    if end < 1 or view[0] >> 5 != 2 or view[0] & 1:
        return 0
    mask = 0
    i = 1
    while i < end:
        at = _find(view[i])
        if at < 0:
            break
        size = _OBJECTS[at + 1] & 0x7F
        if i + 1 + size > end:
            return 0
        place = _OBJECTS[at + 3]
        if place != 0xFF:
            mask |= 1 << place
        i += 1 + size
    return mask


def units(mask: int, into: object = None) -> dict:
    """The units of the metrics in ``mask`` (unit_mask) by metric name, added to the
    dict ``into`` (a new one when None)."""
    out = {} if into is None else into
    for at in range(0, len(_OBJECTS), 4):
        place = _OBJECTS[at + 3]
        if place != 0xFF and mask >> place & 1:
            out[_NAMES[at // 4]] = _UNITS[place]
    return out
