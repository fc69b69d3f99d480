"""Firmware updates on the device (docs/ota.md): the device side of a rollout.

A rollout notifies the device through its desired ``firmware`` property (the release's
id, version, kind, size, and its manifest with the release key's signature). The
:class:`Updater` then:

1. checks the manifest at once (fleetline_release: signed by the release key, for this
   board's target, newer than what runs) and refuses anything else with the reason;
2. asks the API for a download URL over MQTT (``transfers/req``; the answer on
   ``transfers/res`` is signed for this device and short-lived) and downloads over
   HTTPS (fleetline_https), a few slices per pass of the device's loop, resuming with
   ``Range`` after a dropped connection, an expired URL (it asks for a new one) or a
   reset (what arrived is kept in flash and hashed again);
3. verifies the whole image's size and SHA-256 against the manifest;
4. applies it: a bundle (the application's files, ``fleetline firmware bundle``) is
   unpacked into ``next/``, which the loader (fleetline_boot) swaps in at the next boot,
   keeping the files it replaces in ``prev/``; an image (a whole ESP32 firmware) is
   written into the next OTA partition (``esp32.Partition``) set to boot next;
5. reboots; the new version is on trial until it has connected and reported, then
   confirmed (``mark_app_valid_cancel_rollback()`` for an image). One that does not
   come up is rolled back by the loader after ``fleetline_boot.MAX_TRIAL_BOOTS`` boots
   (or by the ESP32 bootloader), and the version that runs again says so.

Every step is reported in ``reported.firmware``: ``{"rollout", "state", "progress",
"version", "running", "reason"}`` with state downloading, verifying, applying,
rebooting, succeeded, failed or rolled_back. The update's own state is kept in
``ota.json`` (written whole, then renamed), so a reset at any point goes on from there.
"""

import gc
import json
import os
import sys

import fleetline_boot
import fleetline_device
import fleetline_https

# Loaded when an update starts (it brings the P-256 arithmetic): a board that is not
# updating keeps that heap.
fleetline_release = None


def _load():
    global fleetline_release
    if fleetline_release is None:
        import fleetline_release as release

        fleetline_release = release


def _unload():
    """The check's modules out of the heap once an update has ended."""
    global fleetline_release
    fleetline_release = None
    for name in ("fleetline_release", "fleetline_ecdsa"):
        sys.modules.pop(name, None)
    gc.collect()

STAGING_FILE = "ota.bin"
# Reads (of fleetline_https.SLICE_BYTES) per pass of the device's loop.
READS_PER_STEP = 4
PROGRESS_EVERY = 10  # percent
# An URL that expires sooner than this is asked for again before it is used.
URL_MARGIN_S = 30
HTTP_TIMEOUT_S = 15
# The bundle's format: MAGIC, then per file: name length (1 byte), name, size (4 bytes,
# big-endian), the bytes.
MAGIC = b"FLB1"
MAX_NAME = 64
IMAGE_BLOCK = 4096


class Updater:
    """The device's updates. ``device``: the fleetline_device.Device it serves;
    ``version``: the version running; ``target``: this board's (the releases' target);
    ``release_key``: the release key's public point (hex); ``tls``: the CA context for
    https URLs; ``partitions``: the esp32 module (image updates), None where there is
    none; ``root``: the application's folder."""

    def __init__(self, device, version, target, release_key, tls=None, partitions=None,
                 root=""):
        self.device = device
        self.version = version
        self.target = target
        self.release_key = release_key
        self.tls = tls
        self.partitions = partitions
        self.root = root
        self.state = fleetline_boot.load(root) or {}
        self._url = None
        self._expires = 0
        self._asking = fleetline_https.Asking()
        self._response = None
        self._out = None
        self._check = None
        self._received = 0
        self._reported = -1
        # Allocated once an update starts and kept (a fragmented heap may have no room for
        # a new one later): the slice every read goes into, an image's block being filled.
        self._buf = None
        self._block = None
        self._fill = 0
        self._announce = False
        device.extensions.append(self)
        device._desired["firmware"] = self.desired

    # -- what the device reports ---------------------------------------------------

    def status(self):
        s = self.state
        phase = s.get("phase")
        state = {"staged": "rebooting", "trial": "rebooting"}.get(phase, phase)
        return {
            "rollout": s.get("rollout"),
            "state": state,
            "progress": self._progress() if phase == "downloading" else None,
            "version": s.get("version"),
            "running": self.version,
            "reason": s.get("reason"),
        }

    def _report(self, state=None):
        """The update's state, published now: each step is seen, none merged away."""
        status = self.status()
        if state is not None:
            status["state"] = state
        self.device._publish(self.device._base + "twin/reported", json.dumps({"firmware": status}))

    def _progress(self):
        size = self.state.get("size") or 1
        return min(100, self._received * 100 // size)

    def _path(self, name):
        return self.root + name

    def _log(self, text):
        self.device._log("fleetline ota: " + text)

    # -- hooks of the device -----------------------------------------------------

    def desired(self, value):
        """The desired ``firmware``: a rollout not seen before starts an update. The
        state is reported by the next step (in order with the update's own reports)."""
        if isinstance(value, dict):
            rollout = value.get("rollout")
            if isinstance(rollout, int) and rollout != self.state.get("rollout"):
                self._start(rollout, value)
                self._announce = True
        return fleetline_device.NOT_REPORTED

    def connected(self):
        """After each connection: the update's state goes out again (next step)."""
        self._url = None
        self._asking.forget()
        self._announce = self.state.get("rollout") is not None

    def on_transfer(self, msg):
        answer = self._asking.answer(msg)
        if answer is None:
            return  # not ours, or to a request given up already
        if answer.get("status") == 200 and isinstance(answer.get("url"), str):
            self._url = answer["url"]
            self._expires = answer.get("expires_at") or 0
            return
        error = str(answer.get("error") or answer.get("status"))[:200]
        if answer.get("status") == 403:
            self._fail("the API refused the download: " + error)
        else:
            self._error("the API did not give a download URL: " + error)

    def step(self):
        """One pass of the device's loop while connected."""
        phase = self.state.get("phase")
        if phase == "trial":
            self._announce = False
            self._confirm()
            return
        if self._announce:
            self._announce = False
            self._report()
        if phase == "staged":  # staged, but the reset did not happen (a lost connection)
            self.device._reboot_requested = True
        elif phase == "downloading" and self._asking.due():
            _load()
            try:
                self._buffers()
                self._download()
            except fleetline_release.Refused as exc:
                self._fail(str(exc))
            except Exception as exc:  # noqa: BLE001 - never a reason to drop the connection
                self._close()
                gc.collect()
                self._error("download: " + repr(exc))

    # -- the update --------------------------------------------------------------

    def _start(self, rollout, told):
        _load()
        self._close()
        self._remove(STAGING_FILE)
        try:
            manifest = fleetline_release.check_manifest(
                told["manifest"].encode(), told["signature"], self.release_key, self.target)
            if manifest["version"] == self.version:  # already there: nothing to do
                self._set({"rollout": rollout, "phase": "succeeded",
                           "version": manifest["version"]})
                _unload()
                return
            if not fleetline_release.newer(manifest["version"], self.version):
                raise fleetline_release.Refused("the release " + manifest["version"]
                                                + " is not newer than the running "
                                                + self.version)
            if manifest["kind"] == "image" and self.partitions is None:
                raise fleetline_release.Refused("this board takes no firmware image")
        except fleetline_release.Refused as exc:
            self._set({"rollout": rollout, "phase": "failed", "reason": str(exc),
                       "version": told.get("version")})
            self._log("release refused: " + str(exc))
            _unload()
            return
        except (KeyError, AttributeError, TypeError, ValueError):
            self._set({"rollout": rollout, "phase": "failed",
                       "reason": "the notification is malformed"})
            _unload()
            return
        self._set({"rollout": rollout, "id": told.get("id"), "phase": "downloading",
                   "version": manifest["version"], "kind": manifest["kind"],
                   "size": manifest["size"], "sha256": manifest["sha256"]})
        self._asking.succeeded()
        self._received = 0
        self._reported = -1
        self._log("updating to " + manifest["version"])

    def _set(self, state):
        self.state = state
        fleetline_boot.save(state, self.root)

    def _buffers(self):
        if self._buf is None:
            gc.collect()
            self._buf = fleetline_https.slice_buffer()
        if self._block is None and self.state.get("kind") == "image":
            self._block = bytearray(IMAGE_BLOCK)

    def _download(self):
        if self._response is None and self._staged_bytes() >= self.state["size"]:
            # All of it arrived before a reset or a lost connection: verified from flash.
            self._received = self._staged_bytes()
            self._check = self._rehash()
            self._verify()
            return
        if self._response is None:
            if self._url is None or fleetline_device.epoch_s() > self._expires - URL_MARGIN_S:
                self._ask()
            else:
                self._open()
            return
        view = memoryview(self._buf)
        for _ in range(READS_PER_STEP):
            n = self._response.readinto(self._buf)
            if not n:
                break
            self._take(view[:n])
            if self.device._feed is not None:
                self.device._feed()
        if self._received >= self.state["size"] or self._response.left == 0:
            self._close()
            self._verify()
            return
        progress = self._progress()
        if progress // PROGRESS_EVERY != self._reported // PROGRESS_EVERY:
            self._reported = progress
            if self._out is not None:
                self._out.flush()  # the file system keeps what arrived across a power cut
            self._report()

    def _ask(self):
        if not self._asking.ask(self.device, {"op": "download", "firmware": self.state.get("id")}):
            self._fail("no answer to the download requests")

    def _open(self):
        self._received = self._staged_bytes()
        headers = {}
        if self._received:
            headers["Range"] = "bytes=" + str(self._received) + "-"
            self._log("resuming the download at " + str(self._received) + " bytes")
        token = self.device.http_authorization()
        if token and self._url.startswith("https://"):  # never in clear: it logs in too
            headers["Authorization"] = token
        response = fleetline_https.request("GET", self._url, headers, tls=self.tls,
                                           timeout_s=HTTP_TIMEOUT_S)
        if response.status == 403:  # expired meanwhile: a new URL
            response.close()
            self._url = None
            self._error("the download URL was refused (403)")
            return
        if response.status != (206 if self._received else 200):
            response.close()
            self._error("the download answered " + str(response.status))
            return
        self._response = response
        self._check = self._rehash()
        self._out = None if self.state["kind"] == "image" else open(self._path(STAGING_FILE), "ab")
        if self._reported < 0:
            self._reported = self._progress()
            self._report()

    def _take(self, data):
        self._check.update(data)
        if self._out is not None:
            self._out.write(data)
        else:
            self._write_image(data)
        self._received += len(data)

    def _staged_bytes(self):
        if self.state["kind"] == "image":
            return self.state.get("written", 0)
        try:
            return os.stat(self._path(STAGING_FILE))[6]
        except OSError:
            return 0

    def _rehash(self):
        """The check of the bytes received so far (a resumed download hashes them again)."""
        check = fleetline_release.ImageCheck(self.state)
        if self.state["kind"] == "image":
            part = self._partition()
            view = memoryview(self._block)
            for done in range(0, self._received, IMAGE_BLOCK):
                part.readblocks(done // IMAGE_BLOCK, self._block)
                check.update(view[:min(IMAGE_BLOCK, self._received - done)])
            self._fill = 0
            return check
        if not self._received:
            return check
        view = memoryview(self._buf)
        with open(self._path(STAGING_FILE), "rb") as f:
            while True:
                n = f.readinto(self._buf)
                if not n:
                    return check
                check.update(view[:n])

    def _close(self):
        if self._response is not None:
            self._response.close()
            self._response = None
        if self._out is not None:
            self._out.close()
            self._out = None

    def _verify(self):
        self._report("verifying")
        self._check.finish()
        self._report("applying")
        if self.state["kind"] == "image":
            self._finish_image()
        else:
            self._unpack()
        self.state["phase"] = "staged"
        self._set(self.state)
        self.device._reboot_requested = True  # even if the report below does not go out
        self._log("staged " + self.state["version"] + "; rebooting")
        self._report()

    def _unpack(self):
        """The bundle's files into next/ (emptied first), and prev/ emptied for the files
        the swap will keep there."""
        for folder in (fleetline_boot.NEXT_DIR, fleetline_boot.PREV_DIR):
            fleetline_boot.empty(self._path(folder))
        names = []
        with open(self._path(STAGING_FILE), "rb") as f:
            if f.read(4) != MAGIC:
                raise fleetline_release.Refused("the bundle is not a fleetline bundle")
            while True:
                head = f.read(1)
                if not head:
                    break
                name = f.read(head[0]).decode()
                if not fleetline_boot.replaceable(name) or name in names:
                    raise fleetline_release.Refused("the bundle holds a file it may not: "
                                                    + name[:MAX_NAME])
                size = int.from_bytes(f.read(4), "big")
                view = memoryview(self._buf)
                with open(self._path(fleetline_boot.NEXT_DIR + "/" + name), "wb") as out:
                    while size > 0:
                        n = f.readinto(view[:min(len(view), size)])
                        if not n:
                            raise fleetline_release.Refused("the bundle is cut short")
                        out.write(view[:n])
                        size -= n
                names.append(name)
        if not names:
            raise fleetline_release.Refused("the bundle holds no file")
        self._remove(STAGING_FILE)
        self.state["files"] = names

    # -- images (esp32.Partition) ----------------------------------------------------

    def _partition(self):
        Partition = self.partitions.Partition
        if "partition" not in self.state:
            part = Partition(Partition.RUNNING).get_next_update()
            self.state["partition"] = part.info()[4]
            self.state["written"] = 0
            self._set(self.state)
            return part
        return Partition(self.state["partition"])

    def _write_image(self, data):
        """Whole blocks into the partition; what is left of a block waits for the next
        slice (and is downloaded again after a reset: ``written`` counts whole blocks)."""
        at = 0
        while at < len(data):
            n = min(IMAGE_BLOCK - self._fill, len(data) - at)
            self._block[self._fill:self._fill + n] = data[at:at + n]
            self._fill += n
            at += n
            if self._fill == IMAGE_BLOCK:
                self._flush_block()

    def _flush_block(self):
        written = self.state.get("written", 0)
        self._partition().writeblocks(written // IMAGE_BLOCK, self._block)
        self._fill = 0
        self.state["written"] = written + IMAGE_BLOCK
        if self.state["written"] % (16 * IMAGE_BLOCK) == 0:
            self._set(self.state)

    def _finish_image(self):
        if self._fill:
            for i in range(self._fill, IMAGE_BLOCK):
                self._block[i] = 0xFF
            self._flush_block()
        self._set(self.state)
        self._partition().set_boot()

    # -- after the reboot ------------------------------------------------------------

    def _confirm(self):
        """The new version has connected and reported: it stays."""
        if self.state.get("kind") == "image" and self.partitions is not None:
            self.partitions.Partition.mark_app_valid_cancel_rollback()
        self.state["phase"] = "succeeded"
        self._set(self.state)
        self._report()
        self._log("running " + self.version + " for good")
        _unload()

    # -- failures ----------------------------------------------------------------

    def _fail(self, reason):
        self._close()
        self._remove(STAGING_FILE)
        self.state["phase"] = "failed"
        self.state["reason"] = reason[:200]
        self._set(self.state)
        self._report()
        self._log("update failed: " + reason)
        _unload()

    def _error(self, what):
        """A failed attempt: again after a backoff, or the update fails after
        fleetline_https.MAX_ERRORS."""
        delay = self._asking.failed()
        if delay is None:
            self._fail(what)
            return
        self._log(what + "; again in " + str(delay) + " s")

    def _remove(self, name):
        try:
            os.remove(self._path(name))
        except OSError:
            pass
