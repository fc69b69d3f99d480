"""micropython-lib's umqtt.simple made fit for a field link: TLS verified against a CA,
and no socket call that waits forever.

umqtt.simple sets a timeout only while it connects; afterwards every read and write
blocks, and ``check_msg`` leaves the socket blocking for good. On a silent link (the
connection open, no packets) a publish then waits for its PUBACK until the hardware
watchdog resets the board, and no reading is taken meanwhile. :func:`client_class`
returns a subclass whose socket:
- gives up on a read or a write after ``timeout_s`` without progress (OSError
  ETIMEDOUT: the device drops the connection and reconnects);
- while it waits, calls ``client.on_wait()`` every ``WAIT_SLICE_MS`` (the device core
  takes its readings into the backlog there and feeds the watchdog).

TLS: ``tls_context(ca_pem)`` is an ``ssl.SSLContext`` that requires the broker's
certificate to chain to the CA and to name the host the device connects to.
"""

import binascii
import errno
import select
import ssl
import time

# How long one read waits before the wait hook runs again.
WAIT_SLICE_MS = 200


def der(pem: bytes) -> bytes:
    """A certificate or private key in DER, from PEM or DER: not every port's mbedtls
    parses PEM (the unix port's does not). The block taken is the first CERTIFICATE or
    ...PRIVATE KEY one (`openssl ecparam -genkey` writes EC PARAMETERS first)."""
    if b"-----BEGIN" not in pem:
        return pem
    parts = pem.split(b"-----")  # text, "BEGIN X", body, "END X", text, ...
    for i in range(1, len(parts) - 1, 4):
        label = parts[i]
        if label.endswith(b"CERTIFICATE") or label.endswith(b"PRIVATE KEY"):
            body = parts[i + 1]
            return binascii.a2b_base64(body.replace(b"\r", b"").replace(b"\n", b""))
    raise ValueError("no certificate or private key in the PEM")


def tls_context(ca: bytes, cert: bytes = b"", key: bytes = b"") -> object:
    """TLS client context: the server is verified against the CA certificate ``ca``
    (PEM or DER); with ``cert`` and ``key`` (PEM or DER) the device presents its client
    certificate (an X.509 identity)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=der(ca))
    if cert:
        context.load_cert_chain(der(cert), der(key))
    return context


class _TimedSocket:
    """The stream umqtt.simple reads and writes, kept non-blocking underneath: a blocking
    read or write is emulated with poll, so a wait is bounded and never an error inside
    the TLS layer (a socket timeout there would end the TLS session for good)."""

    def __init__(self, stream: object, timeout_s: float, client: object) -> None:
        self.stream = stream
        self.timeout_ms = int(timeout_s * 1000)
        self.client = client
        self.blocking = True
        self.poller = select.poll()
        self.poller.register(stream, select.POLLIN)
        stream.setblocking(False)

    def _wait(self, started: int, event: int) -> None:
        """Wait up to one slice for ``event``; the hook runs; past the timeout, raise."""
        if time.ticks_diff(time.ticks_ms(), started) >= self.timeout_ms:
            raise OSError(errno.ETIMEDOUT)
        self.poller.modify(self.stream, event)
        if not self.poller.poll(WAIT_SLICE_MS):
            hook = self.client.on_wait
            if hook is not None:
                hook()

    def write(self, data: bytes, length: int = -1) -> int:
        view = memoryview(data)[: len(data) if length < 0 else length]
        started = time.ticks_ms()
        sent = 0
        while sent < len(view):
            n = self.stream.write(view[sent:])
            if n:
                sent += n
                started = time.ticks_ms()  # progress: the timeout counts from here
            else:
                self._wait(started, select.POLLOUT)
        return sent

    def read(self, n: int) -> object:
        if not self.blocking:  # check_msg: whatever is there now, or None
            return self.stream.read(n)
        started = time.ticks_ms()
        data = b""
        while len(data) < n:
            chunk = self.stream.read(n - len(data))
            if chunk is None:
                self._wait(started, select.POLLIN)
            elif not chunk:  # the peer closed the connection
                raise OSError(errno.ECONNRESET)
            else:
                data += chunk
                started = time.ticks_ms()  # progress: the timeout counts from here
        return data

    def setblocking(self, flag: bool) -> None:
        self.blocking = flag  # the stream itself stays non-blocking

    def close(self) -> None:
        self.stream.close()


def client_class(mqtt_class: object, timeout_s: float = 10, tls: object = None) -> object:
    """A subclass of umqtt.simple's ``mqtt_class`` with bounded socket waits, over TLS
    with the context ``tls`` (see :func:`tls_context`) when given."""

    class Client(mqtt_class):
        on_wait = None

        def __init__(
            self,
            client_id: str,
            server: str,
            port: int = 0,
            user: object = None,
            password: object = None,
            keepalive: int = 0,
        ) -> None:
            super().__init__(client_id, server, port, user, password, keepalive, ssl=tls)

        def connect(self, clean_session: bool = True, timeout: object = None) -> int:
            present = super().connect(clean_session, timeout_s)
            self.sock = _TimedSocket(self.sock, timeout_s, self)
            return present

    return Client
