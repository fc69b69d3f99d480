"""Files the device uploads (docs/uploads.md): diagnostics, logs, captures.

:meth:`Uploader.upload` queues a file of the device's ``files/`` folder. For each, one at
a time and a part per pass of the device's loop, the :class:`Uploader`:
1. hashes the file (SHA-256, a slice at a time) and asks the API over MQTT
   (``transfers/req``: ``{"op": "upload", "name", "size", "sha256", "content_type"}``)
   for a URL signed for this device and file; the answer says where the upload stands
   (``received``: 0, or more when an upload of the same file was cut);
2. PUTs the bytes in parts (a slice each) with ``Content-Range`` over HTTPS
   (fleetline_https), proving itself with a SAS token (never over plain http). A dropped
   connection, an expired URL (403) or a part out of place (409) makes it ask again,
   after a backoff, and it goes on from where the API says the upload stands; after
   fleetline_https.MAX_ERRORS failed attempts (unanswered requests count) it gives up.
   The last part completes the file: the API checks the hash, and a file that changed
   since it was hashed (422) is given up.
Only files of ``files/`` go: the device's key, certificate and settings never do. The
queue is in RAM: a reset forgets the files not yet uploaded (the API keeps an unfinished
upload, which a new request for the same file resumes).
MicroPython and CPython alike.
"""

import binascii
import gc
import hashlib
import os

import fleetline_https

FOLDER = "files/"
MAX_QUEUED = 8
HTTP_TIMEOUT_S = 15


class Uploader:
    """``device``: the fleetline_device.Device; ``tls``: the CA context for https URLs."""

    def __init__(self, device, tls=None, root=""):
        self.device = device
        self.tls = tls
        self.folder = root + FOLDER
        self.queue = []  # (name, content type)
        self.done = []  # names uploaded, for a status screen and the tests
        self._current = None  # {"name", "type", "size", "sha256"}
        self._url = None
        self._received = 0
        self._asking = fleetline_https.Asking()
        # Parts of fleetline_https.SLICE_BYTES, read into the buffer the updates share.
        self._buf = fleetline_https.slice_buffer()
        device.extensions.append(self)

    def upload(self, name, content_type="application/octet-stream"):
        """Queue ``files/<name>``; ValueError when it is not there or the queue is full."""
        if "/" in name or name.startswith(".") or not name or len(name) > 128:
            raise ValueError("a file of the files/ folder, by its name")
        if not content_type or len(content_type) > 128:
            raise ValueError("content_type is a media type of 128 characters at most")
        try:
            os.stat(self.folder + name)
        except OSError:
            raise ValueError("no file files/" + name) from None
        if len(self.queue) >= MAX_QUEUED:
            raise ValueError("already " + str(MAX_QUEUED) + " uploads queued")
        self.queue.append((name, content_type))

    # -- hooks of the device -----------------------------------------------------

    def connected(self):
        self._asking.forget()
        self._url = None  # asked again: the answer says where the upload stands

    def on_transfer(self, msg):
        answer = self._asking.answer(msg)
        if answer is None:
            return
        if answer.get("status") == 200 and isinstance(answer.get("url"), str):
            self._url = answer["url"]
            self._received = answer.get("received") or 0
            return
        error = str(answer.get("error") or answer.get("status"))[:200]
        if answer.get("status") in (400, 404, 409, 413):  # asking again changes nothing
            self._give_up("refused: " + error)
        else:
            self._error("no upload URL: " + error)

    def step(self):
        if self._current is None:
            if not self.queue:
                return
            name, content_type = self.queue.pop(0)
            try:
                self._current = self._describe(name, content_type)
            except Exception as exc:  # noqa: BLE001 - the next file goes on
                self._log("cannot read files/" + name + ": " + repr(exc))
                return
            self._asking.succeeded()
        if not self._asking.due():
            return
        if self._url is None:
            c = self._current
            request = {"op": "upload", "name": c["name"], "size": c["size"],
                       "sha256": c["sha256"], "content_type": c["type"]}
            if not self._asking.ask(self.device, request):
                self._give_up("no answer to the upload requests")
            return
        try:
            self._put()
        except Exception as exc:  # noqa: BLE001 - never a reason to drop the connection
            self._url = None
            gc.collect()
            self._error("upload: " + repr(exc))

    # -- the upload --------------------------------------------------------------

    def _describe(self, name, content_type):
        digest = hashlib.sha256()
        size = 0
        view = memoryview(self._buf)
        with open(self.folder + name, "rb") as f:
            while True:
                n = f.readinto(self._buf)
                if not n:
                    break
                digest.update(view[:n])
                size += n
        return {"name": name, "type": content_type, "size": size,
                "sha256": binascii.hexlify(digest.digest()).decode()}

    def _put(self):
        c = self._current
        start = self._received
        view = memoryview(self._buf)
        with open(self.folder + c["name"], "rb") as f:
            f.seek(start)
            n = f.readinto(view[:min(len(view), c["size"] - start)])
        if not n:
            self._give_up("the file shrank while it was uploaded")
            return
        end = start + n - 1
        headers = {"Content-Range": "bytes " + str(start) + "-" + str(end) + "/" + str(c["size"]),
                   "Content-Type": "application/octet-stream"}
        token = self.device.http_authorization()
        if token and self._url.startswith("https://"):  # never in clear: it logs in too
            headers["Authorization"] = token
        body = view[:n]  # sent from the buffer: no copy
        response = fleetline_https.request("PUT", self._url, headers, body, tls=self.tls,
                                           timeout_s=HTTP_TIMEOUT_S)
        status = response.status
        response.close()
        if status == 200:
            self._received = end + 1
            if self._received >= c["size"]:
                self._asking.succeeded()
                self._log("uploaded files/" + c["name"])
                self.done.append(c["name"])
                self._current = None
                self._url = None
            return
        self._url = None  # 403 expired, 409 elsewhere: ask where it stands
        if status == 422:  # the bytes changed since they were hashed
            self._give_up("the file changed while it was uploaded")
            return
        self._error("the upload answered " + str(status))

    def _error(self, what):
        delay = self._asking.failed()
        if delay is None:
            self._give_up(what)
            return
        self._log(what + "; again in " + str(delay) + " s")

    def _give_up(self, why):
        if self._current is not None:
            self._log("files/" + self._current["name"] + " not uploaded: " + why)
        self._current = None
        self._url = None
        self._asking.succeeded()

    def _log(self, text):
        self.device._log("fleetline upload: " + text)
