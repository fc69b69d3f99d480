"""Firmware updates and file uploads wired into the reference application (main.py):
firmware updates (fleetline_ota) when the config holds the release key, and the method
``upload`` ({"name": a file of files/, "content_type"}), which uploads that file
(fleetline_upload, loaded at its first call). main.py loads this module only where the
board layer says transfers fit (not on an ESP8266's heap, unless TRANSFERS = True).
MicroPython only.
"""

import gc

import fleetline_board
import fleetline_umqtt

_https = []


def _https_context(config):
    """The CA context https URLs (transfers) are verified with: the broker's CA, one
    context for the updates and the uploads."""
    if not _https:
        path = fleetline_board.ca_file(config)
        gc.collect()
        ca = fleetline_board.read_file(path) if path else None
        _https.append(fleetline_umqtt.tls_context(ca) if ca else None)
    return _https[0]


def start(device, config, version, platform):
    """Firmware updates (fleetline_ota) when the config holds the release key; and the
    method ``upload`` ({"name": a file of files/, "content_type"}), which uploads that
    file (fleetline_upload, loaded at the first call)."""
    made = []

    def upload(params):
        name = params.get("name") if isinstance(params, dict) else None
        if not isinstance(name, str):
            raise ValueError("params.name is a file of the files/ folder")
        if not made:
            gc.collect()
            import fleetline_upload

            made.append(fleetline_upload.Uploader(device, tls=_https_context(config)))
        made[0].upload(name, params.get("content_type") or "application/octet-stream")
        return 202, {"queued": name}

    device._methods["upload"] = upload
    release_key = getattr(config, "RELEASE_KEY", "")
    if not release_key:
        return None
    import fleetline_https
    import fleetline_ota

    fleetline_https.slice_buffer()  # now, while the heap is whole

    try:
        import esp32  # noqa: PLC0415 - image updates need the OTA partitions
    except ImportError:
        esp32 = None
    return fleetline_ota.Updater(device, version, getattr(config, "TARGET", platform),
                                 release_key, tls=_https_context(config), partitions=esp32)
