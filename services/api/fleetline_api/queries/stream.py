"""The live stream (workers/stream.py): what it reads besides the events themselves."""

from __future__ import annotations

# The tags of the devices $1, for the stream's filters by tag (no row: the device is gone).
DEVICE_TAGS = "SELECT id, tags FROM devices WHERE id = ANY($1::text[])"
