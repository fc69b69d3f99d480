"""Test helpers: a device that publishes over a real broker, the ingest process, waiting."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Self

import asyncpg
import orjson
import paho.mqtt.client as mqtt
import psutil

from fleetline_dev.embedded import free_port

# This run's device-key secret: the API derives device keys from it, the broker checks them.
DEVICE_KEY_SECRET = secrets.token_hex(32)
# A test report's user property holding (section, line): printed at the end of the run
# (tests/conftest.py), from pytest-xdist's worker processes too.
SUMMARY_PROPERTY = "summary_line"


def wait_until(check: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.05,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Device:
    """An MQTT publisher standing in for a device (real paho client, real broker)."""

    def __init__(self, url: str, device_id: str, *, persistent: bool = False,
                 password: str | None = None, ca_file: Path | None = None,
                 connect_timeout: float = 10.0) -> None:
        """``password``: log in as the device (user name = client id = device id) with its
        key or a SAS token, as a broker with the auth plugin requires. An ``mqtts://``
        URL connects over TLS, the broker verified against ``ca_file``. No CONNACK within
        ``connect_timeout`` seconds (a refusal ends the wait at once) is an AssertionError."""
        tls = url.startswith("mqtts://")
        host, port = url.removeprefix("mqtts://").removeprefix("mqtt://").split(":")
        self.device_id = device_id
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311,
            clean_session=not persistent,
        )
        # A hundred QoS 1 publishes awaiting their PUBACK, the rest queued in the client
        # (unbounded). A wider window costs more than it gains: paho scans the window for
        # the next queued message at every PUBACK, so with 1,000 ten devices publishing
        # 2,000 readings each took 1.5 to 3 times as long as with 100.
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.connected = threading.Event()
        self.refused: Any = None

        def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
            if reason.is_failure:
                self.refused = reason
            else:
                self.connected.set()

        self.client.on_connect = on_connect
        self.client.on_disconnect = lambda *_a: self.connected.clear()
        if password is not None:
            self.client.username_pw_set(device_id, password)
        if tls:
            self.client.tls_set(ca_certs=str(ca_file) if ca_file else None)
        self.client.connect(host, int(port))
        self.client.loop_start()
        deadline = time.monotonic() + connect_timeout
        while not self.connected.wait(0.05) and self.refused is None:
            if time.monotonic() > deadline:
                break
        if not self.connected.is_set():
            self.client.loop_stop()
            raise AssertionError(
                f"device {device_id} could not connect to {url} ({self.refused or 'no answer'})")

    def publish(self, payload: bytes | str | Any, *, kind: str = "telemetry",
                retain: bool = False) -> mqtt.MQTTMessageInfo:
        if not isinstance(payload, bytes | str):
            payload = orjson.dumps(payload)
        return self.client.publish(f"devices/{self.device_id}/{kind}", payload, qos=1,
                                   retain=retain)

    def publish_all(self, payloads: Iterable[Any], *, kind: str = "telemetry",
                    timeout: float = 60.0) -> int:
        infos = [self.publish(p, kind=kind) for p in payloads]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "broker did not acknowledge a publish in time"
        return len(infos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def reading(ts_ms: int, **values: Any) -> dict[str, Any]:
    return {"ts": ts_ms, "values": values}


class ServiceProcess:
    """``python -m fleetline_cli <service>`` as a child process, as production runs it."""

    service = ""
    port_variable = ""

    def __init__(self, *, database_url: str, mqtt_url: str, log_dir: Path, name: str,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.metrics_port = self.port  # the API serves /metrics on a port of its own
        self.log_path = log_dir / f"{self.service}-{name}.log"
        self.env = {
            **os.environ,
            "FLEETLINE_DATABASE_URL": database_url,
            "FLEETLINE_MQTT_URL": mqtt_url,
            "FLEETLINE_LOG_FORMAT": "json",
            "FLEETLINE_LOG_LEVEL": "INFO",
            self.port_variable: str(self.port),
            **self.service_env(name),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def service_env(self, name: str) -> dict[str, str]:
        return {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_ready: bool = True) -> Self:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleetline_cli", self.service], env=self.env, stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if wait_ready:
            # Polled often: until the port is open a probe is a refused connection.
            wait_until(self.ready, timeout=30, interval=0.02,
                       what=f"{self.service} ready (log: {self.log_path})")
        return self

    def _get(self, path: str, port: int | None = None) -> tuple[int, str]:
        url = f"http://127.0.0.1:{port or self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"{self.service} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )
        return self._get("/readyz")[0] == 200

    def metric_names(self) -> set[str]:
        """The names of the metrics the service exports."""
        status, text = self._get("/metrics", self.metrics_port)
        assert status == 200, f"{self.service} /metrics did not answer"
        return set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", text, re.M))

    def metric(self, name: str) -> float:
        status, text = self._get("/metrics", self.metrics_port)
        assert status == 200, f"{self.service} /metrics did not answer"
        total = 0.0
        for match in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M):
            total += float(match.group(1))
        return total

    def terminate(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()


class IngestProcess(ServiceProcess):
    service = "ingest"
    port_variable = "FLEETLINE_INGEST_HTTP_PORT"

    def service_env(self, name: str) -> dict[str, str]:
        return {
            "FLEETLINE_INGEST_HTTP_HOST": "127.0.0.1",
            # Each test's ingest is its own replica with the shipped default: a plain
            # persistent subscription under its own client id.
            "FLEETLINE_INGEST_CLIENT_ID": f"test-ingest-{name}",
            # A stopped test's session (devices/#) would queue the rest of the run's
            # messages for a day, which loads the shared broker for every later test: a
            # minute covers every restart a test makes.
            "FLEETLINE_INGEST_SESSION_EXPIRY_SECONDS": "60",
            "FLEETLINE_INGEST_BATCH_MS": "50",
        }


_RELEASE_KEY: list[Path] = []


def release_key_file() -> Path:
    """The run's firmware release key (PEM), made once: every API process signs with it."""
    if not _RELEASE_KEY:
        from fleetline import releases

        path = Path(tempfile.mkdtemp(prefix="fleetline-release-")) / "release-key.pem"
        releases.write_key(path, releases.generate_key())
        _RELEASE_KEY.append(path)
    return _RELEASE_KEY[0]


class ApiProcess(ServiceProcess):
    service = "api"
    port_variable = "FLEETLINE_API_PORT"
    # The devices' HTTPS listener, when FLEETLINE_API_DEVICE_PORT is set.
    device_url = ""

    def service_env(self, name: str) -> dict[str, str]:
        self.metrics_port = free_port()
        return {"FLEETLINE_API_HOST": "127.0.0.1", "FLEETLINE_DEVICE_KEY_SECRET": DEVICE_KEY_SECRET,
                "FLEETLINE_API_METRICS_HOST": "127.0.0.1",
                "FLEETLINE_API_METRICS_PORT": str(self.metrics_port),
                # Tests poll and fuzz with one key far above a client's rate: the limit
                # per key is tested on its own (tests/integration/test_api_limits.py).
                "FLEETLINE_API_RATE_PER_KEY": "0",
                # ...and so is the limit on failed provisioning attempts per address
                # (tests/integration/test_provisioning.py).
                "FLEETLINE_API_PROVISION_FAILURES_BURST": "0",
                # The job runner's sweep (leases that ran out, rollout devices' reports and
                # phase timeouts) five times a second rather than once: a test waits for
                # each step it makes a device report, not for the sweep's clock.
                "FLEETLINE_API_JOBS_SWEEP_INTERVAL_SECONDS": "0.2",
                "FLEETLINE_API_RELEASE_KEY_FILE": str(release_key_file())}


class RulesProcess(ServiceProcess):
    service = "rules"
    port_variable = "FLEETLINE_RULES_HTTP_PORT"

    def service_env(self, name: str) -> dict[str, str]:
        return {"FLEETLINE_RULES_HTTP_HOST": "127.0.0.1"}


async def full_notify_queue(
    db: Any, uid: str, table: str, when: str, *, on: str = "INSERT OR UPDATE"
) -> Callable[[], Awaitable[None]]:
    """Make ``db`` act as PostgreSQL does while its NOTIFY queue is full: the COMMIT of a
    transaction that wrote (``on``) a row of ``table`` matching ``when`` (SQL over NEW or
    OLD) fails with 54000, unless the transaction set ``fleetline.quiet`` (as writers do
    when they retry without notifying). Returns the coroutine function that undoes it."""
    fn, trigger = f'"{uid}-queue-full"', f'"{uid}-queue-full-trigger"'
    await db.execute(f"""
        CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF ({when})
               AND current_setting('fleetline.quiet', true) IS DISTINCT FROM 'on' THEN
                RAISE EXCEPTION 'too many notifications in the NOTIFY queue'
                    USING ERRCODE = '54000';
            END IF;
            RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER {trigger} AFTER {on} ON {table}
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {fn}();
    """)

    async def undo() -> None:
        await db.execute(f"DROP TRIGGER {trigger} ON {table}; DROP FUNCTION {fn}()")

    return undo


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """A server frozen as a stalled host would be: SIGSTOP to the process and all its
    children (PostgreSQL's backends) for the block, then SIGCONT."""
    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    for p in tree:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGCONT)


class TcpProxy:
    """127.0.0.1:port → target, which the test can cut (`down`: connections refused,
    open ones closed on both sides, as a network drop would) and restore (`up`) on the
    same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._frozen = threading.Event()

    def up(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not.
            try:
                self._server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._server.close()
            self._server = None
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._conns.clear()

    def freeze(self) -> None:
        """A silent link: connections stay open (and new ones are accepted), but nothing
        gets through in either direction."""
        self._frozen.set()

    def thaw(self) -> None:
        """The link back: what was open while frozen is closed (as a path that lost
        packets for long resets its connections), and new connections go through."""
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._frozen.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)  # the timeout was for connecting only
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self._frozen.is_set():  # frozen: lost on the way
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


async def settle_rollups(db: asyncpg.Pool[Any] | asyncpg.Connection[Any]) -> None:
    """Run the continuous aggregates' refresh policies now, minutes before hours, as
    TimescaleDB's scheduler does within their schedule (migration 0026): readings written
    into minutes already materialized show in the rollups after it. Nothing to do on
    plain PostgreSQL, whose rollups are exact when their readings commit."""
    if not await db.fetchval("SELECT timescale FROM storage_config"):
        return
    jobs = await db.fetch(
        "SELECT job_id FROM timescaledb_information.jobs"
        " WHERE proc_name = 'policy_refresh_continuous_aggregate'"
        " ORDER BY hypertable_name = 'telemetry_1h'")
    for job in jobs:
        for attempt in range(50):
            try:
                await db.execute(f"CALL run_job({int(job['job_id'])})")
                break
            except asyncpg.LockNotAvailableError:
                # The scheduler is running this refresh now; ours runs after it.
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
