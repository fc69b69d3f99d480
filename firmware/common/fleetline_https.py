"""A small HTTP/1.1 client for the device's downloads and uploads (docs/ota.md).

One request per connection (``Connection: close``), over TLS verified with the same CA
context as the broker connection (fleetline_umqtt.tls_context) for an ``https://`` URL.
The response's body is read by the caller, a slice at a time (``readinto``), so a download of
any size holds only one slice in memory; every socket wait gives up after ``timeout_s``.
MicroPython and CPython alike (tested on the unix port).
"""

import json
import random
import socket

import fleetline_device

# A status line or header longer than this is not one this client reads.
MAX_LINE = 1024
MAX_HEADERS = 32
# The slice transfers read into and send from (the updates and the uploads share it: each
# uses it within one pass of the device's loop), made once: a fragmented heap may have
# no room for a new one later.
SLICE_BYTES = 2048
_slice = []


def slice_buffer():
    if not _slice:
        _slice.append(bytearray(SLICE_BYTES))
    return _slice[0]


class HttpError(Exception):
    pass


# A transfer request unanswered this long is asked again; failed attempts wait from
# RETRY_MIN_MS, doubling, up to RETRY_MAX_MS; after MAX_ERRORS the transfer gives up.
ANSWER_TIMEOUT_MS = 15000
RETRY_MIN_MS = 2000
RETRY_MAX_MS = 60000
MAX_ERRORS = 30


class Asking:
    """A transfer's requests for a URL over MQTT (``transfers/req``, the answers on
    ``transfers/res`` matched by id) and the backoff between its failed attempts: what
    the updates and the uploads share."""

    def __init__(self):
        self.id = None
        self.at = 0
        self.retry_at = None
        self.errors = 0

    def ask(self, device, request):
        """Publish ``request`` with a new id, unless one is waiting for its answer; a
        request left unanswered counts as a failed attempt. False once the attempts are
        used up (the caller gives up)."""
        now = fleetline_device._ticks_ms()
        if self.id is not None:
            if fleetline_device._ticks_diff(now, self.at) < ANSWER_TIMEOUT_MS:
                return True
            self.id = None  # unanswered: asked again after the backoff
            return self.failed() is not None
        self.id = hex(random.getrandbits(30))[2:] + hex(random.getrandbits(30))[2:]
        self.at = now
        request["id"] = self.id
        device._publish(device._base + "transfers/req", json.dumps(request))
        return True

    def answer(self, msg):
        """The answer to the request waiting (a dict), or None for anything else."""
        try:
            answer = json.loads(msg) if msg is not None else None
        except ValueError:
            return None
        if not isinstance(answer, dict) or self.id is None or answer.get("id") != self.id:
            return None
        self.id = None
        return answer

    def forget(self):
        """A new connection: answers to earlier requests may never come."""
        self.id = None

    def due(self):
        now = fleetline_device._ticks_ms()
        return self.retry_at is None or fleetline_device._ticks_diff(now, self.retry_at) >= 0

    def failed(self):
        """A failed attempt: how many seconds until the next, or None after MAX_ERRORS."""
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            return None
        delay = min(RETRY_MAX_MS, RETRY_MIN_MS * (2 ** min(self.errors - 1, 6)))
        self.retry_at = fleetline_device._ticks_add(fleetline_device._ticks_ms(), delay)
        return delay // 1000

    def succeeded(self):
        self.errors = 0
        self.retry_at = None


def split_url(url):
    """(tls, host, port, path) of an http(s) URL."""
    if url.startswith("https://"):
        tls, rest = True, url[8:]
    elif url.startswith("http://"):
        tls, rest = False, url[7:]
    else:
        raise HttpError("not an http(s) URL")
    slash = rest.find("/")
    hostport, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    host, _, port = hostport.partition(":")
    return tls, host, int(port) if port else (443 if tls else 80), path


class Response:
    """A response whose headers were read; the body follows with :meth:`readinto`."""

    def __init__(self, sock, stream, status, headers):
        self._sock = sock
        self._stream = stream
        self.status = status
        self.headers = headers
        length = headers.get("content-length")
        self.left = int(length) if length is not None else -1

    def readinto(self, buf):
        """Up to ``len(buf)`` bytes of the body into ``buf``; how many (0 at its end)."""
        if self.left == 0:
            return 0
        view = memoryview(buf)
        if 0 < self.left < len(buf):
            view = view[:self.left]
        n = self._stream.readinto(view) or 0
        if not n and self.left > 0:
            raise HttpError("the connection closed before the body ended")
        if self.left > 0:
            self.left -= n
        return n

    def close(self):
        _close(self._stream)
        _close(self._sock)


def _close(thing):
    try:
        thing.close()
    except Exception:
        pass


def _line(sock):
    line = sock.readline()
    if not line or len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise HttpError("no HTTP response, or a line too long")
    return line.rstrip(b"\r\n")


def request(method, url, headers=None, body=None, tls=None, timeout_s=15):
    """Send the request and read the status and headers; the caller reads the body and
    closes the :class:`Response`. ``body``: bytes sent whole, or None."""
    secure, host, port, path = split_url(url)
    if secure and tls is None:
        raise HttpError("an https URL needs the TLS context")
    addr = socket.getaddrinfo(host, port)[0][-1]
    sock = socket.socket()
    try:
        sock.settimeout(timeout_s)
        sock.connect(addr)
        if secure:
            sock = tls.wrap_socket(sock, server_hostname=host)
        # MicroPython's sockets are streams; CPython's (the Raspberry Pi agent) make one.
        stream = sock if hasattr(sock, "readline") else sock.makefile("rwb")
        lines = [method + " " + path + " HTTP/1.1", "Host: " + host, "Connection: close"]
        for name in headers or {}:
            lines.append(name + ": " + headers[name])
        if body is not None:
            lines.append("Content-Length: " + str(len(body)))
        stream.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        if body:
            stream.write(body)
        if hasattr(stream, "flush"):
            stream.flush()
        status_line = _line(stream).split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise HttpError("not an HTTP response")
        status = int(status_line[1])
        found = {}
        for _ in range(MAX_HEADERS + 1):
            line = _line(stream)
            if not line:
                return Response(sock, stream, status, found)
            name, _, value = line.partition(b":")
            found[name.strip().lower().decode()] = value.strip().decode()
        raise HttpError("too many headers")
    except Exception:
        _close(sock)
        raise
