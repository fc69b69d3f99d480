"""The whole stack as the prod overlay runs it, on free ports, with a hand on each part:
its own PostgreSQL (TimescaleDB preloaded, or plain), the broker with the project's
config, the auth plugin and TLS, one ingest replica reaching the database through a
relay the suite controls, two API processes, one rules process. Every service can be
killed (SIGKILL), the broker restarted or killed, the database restarted, crashed or
paused (SIGSTOP), the relay cut; a sampler records each service's memory and the
broker's message store meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil

from fleetline.migrate import migrate
from fleetline.settings import StorageSettings
from fleetline_dev.certs import TlsFiles, ensure_local_ca
from fleetline_dev.embedded import BrokerAuth, LocalMosquitto, LocalPostgres, free_port
from tests.support import (
    DEVICE_KEY_SECRET,
    ApiProcess,
    IngestProcess,
    RulesProcess,
    ServiceProcess,
    TcpProxy,
    paused,
    release_key_file,
    wait_until,
)

ACCOUNTS = {name: secrets.token_urlsafe(16) for name in ("ingest", "api", "rules", "chaos")}
SAMPLE_SECONDS = 1.0
STORE_TOPIC = "$SYS/broker/store/messages/count"


@dataclass
class Samples:
    """The peak RSS of each service and of the broker (bytes, over their restarts) and
    the broker's largest message store."""

    peak_rss: dict[str, int] = field(default_factory=dict)
    max_store: int = 0


class Cluster:
    def __init__(self, root: Path, log_dir: Path, *, timescaledb: bool) -> None:
        self.root = root
        self.log_dir = log_dir
        self.timescaledb = timescaledb
        self.pg = LocalPostgres(root / "pg", timescaledb=timescaledb)
        self.tls: TlsFiles = ensure_local_ca(root / "tls", ["127.0.0.1", "localhost"])
        self.relay: TcpProxy | None = None
        self.broker: LocalMosquitto | None = None
        self.ingest: IngestProcess | None = None
        self.apis: list[ApiProcess] = []
        self.rules: RulesProcess | None = None
        self.samples = Samples()
        self._stop = threading.Event()
        self._fault = threading.Lock()
        self._sampler: threading.Thread | None = None
        self._store_client: mqtt.Client | None = None

    @property
    def url(self) -> str:
        return self.pg.url_for("fleetline")

    def services(self) -> dict[str, ServiceProcess]:
        named: dict[str, ServiceProcess] = {f"api-{i}": a for i, a in enumerate(self.apis)}
        if self.ingest is not None:
            named["ingest"] = self.ingest
        if self.rules is not None:
            named["rules"] = self.rules
        return named

    def mqtt_url(self, account: str) -> str:
        assert self.broker is not None
        return f"mqtt://{account}:{ACCOUNTS[account]}@127.0.0.1:{self.broker.port}"

    def start(self) -> None:
        self.pg.start()
        storage = StorageSettings(timescale="on" if self.timescaledb else "off")
        asyncio.run(migrate(self.url, storage))
        self.relay = TcpProxy(("127.0.0.1", self.pg.port))
        self.relay.up()
        relayed = f"postgresql://postgres@127.0.0.1:{self.relay.port}/fleetline"
        auth = BrokerAuth(database_url=self.url, key_secret=DEVICE_KEY_SECRET.encode(),
                          services=ACCOUNTS)
        # $SYS every second: the report's broker store is sampled from it.
        self.broker = LocalMosquitto(self.root / "mq", auth=auth, tls=self.tls,
                                     extra_config="sys_interval 1")
        self.broker.start()
        logs = self.log_dir
        self.ingest = IngestProcess(
            database_url=relayed, mqtt_url=self.mqtt_url("ingest"), log_dir=logs, name="chaos",
            env={"FLEETLINE_INGEST_SESSION_EXPIRY_SECONDS": "3600",
                 "FLEETLINE_LOG_LEVEL": "WARNING"})
        for i in range(2):
            self.apis.append(ApiProcess(
                database_url=self.url, mqtt_url=self.mqtt_url("api"), log_dir=logs,
                name=f"chaos-{i}",
                env={"FLEETLINE_API_DEVICE_MQTT_URL": self.broker.tls_url,
                     "FLEETLINE_API_DEVICE_PORT": str(free_port()),
                     "FLEETLINE_API_DEVICE_TLS_CERT_FILE": str(self.tls.server_cert),
                     "FLEETLINE_API_DEVICE_TLS_KEY_FILE": str(self.tls.server_key),
                     "FLEETLINE_API_RELEASE_KEY_FILE": str(release_key_file()),
                     # A killed API's job devices go to the other one 5 s after their
                     # timeout (30 s by default): the run's jobs end within it.
                     "FLEETLINE_API_JOBS_LEASE_GRACE_SECONDS": "5",
                     "FLEETLINE_API_C2D_ACK_TIMEOUT_S": "5",
                     "FLEETLINE_LOG_LEVEL": "WARNING"}))
        self.rules = RulesProcess(database_url=self.url, mqtt_url=self.mqtt_url("rules"),
                                  log_dir=logs, name="chaos",
                                  env={"FLEETLINE_LOG_LEVEL": "WARNING"})
        for service in self.services().values():
            service.start()
        self._watch_store()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def api_device_url(self, i: int) -> str:
        return f"https://127.0.0.1:{self.apis[i].env['FLEETLINE_API_DEVICE_PORT']}"

    # -- what the suite watches ----------------------------------------------------------

    def _watch_store(self) -> None:
        assert self.broker is not None
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="chaos-sampler")
        client.username_pw_set("chaos", ACCOUNTS["chaos"])
        client.reconnect_delay_set(min_delay=0.2, max_delay=1)

        def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
            with contextlib.suppress(ValueError):
                count = int(message.payload)
                self.samples.max_store = max(self.samples.max_store, count)

        client.on_connect = lambda c, *_a: c.subscribe(STORE_TOPIC)
        client.on_message = on_message
        client.connect_async("127.0.0.1", self.broker.port)
        client.loop_start()
        self._store_client = client

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            running = {n: s.proc.pid for n, s in self.services().items()
                       if s.proc is not None and s.proc.poll() is None}
            if self.broker is not None and self.broker.pid is not None:
                running["mosquitto"] = self.broker.pid
            for name, pid in running.items():
                with contextlib.suppress(psutil.Error):
                    rss = int(psutil.Process(pid).memory_info().rss)
                    self.samples.peak_rss[name] = max(self.samples.peak_rss.get(name, 0), rss)

    # -- faults: one at a time, none once the cluster stops (each under _fault) --------

    def kill_service(self, service: ServiceProcess) -> None:
        with self._fault:
            if self._stop.is_set():
                return
            service.kill()
            self._stop.wait(1)
            service.start()

    def restart(self, server: LocalMosquitto | LocalPostgres, *, crash: bool) -> None:
        """Stop the server (its own way, or SIGKILL to every process of it), start it."""
        with self._fault:
            if self._stop.is_set():
                return
            if crash:
                server.kill()
                self._stop.wait(1)
            else:
                server.stop()
            server.start()

    def pause_database(self, seconds: float) -> None:
        with self._fault:
            pid = self.pg.pid
            if self._stop.is_set() or pid is None:
                return
            with paused(pid):
                self._stop.wait(seconds)

    def cut_relay(self, seconds: float, *, silent: bool) -> None:
        assert self.relay is not None
        with self._fault:
            if self._stop.is_set():
                return
            if silent:
                self.relay.freeze()
                self._stop.wait(seconds)
                self.relay.thaw()
            else:
                self.relay.down()
                self._stop.wait(seconds)
                self.relay.up()

    def wait_ready(self, timeout: float = 60) -> None:
        """Every service answers /readyz (after a fault: it has recovered)."""
        for name, service in self.services().items():
            wait_until(service.ready, timeout=timeout, interval=0.2, what=f"{name} ready again")

    def stop(self) -> None:
        """Stop everything, each part even if another fails to stop; a fault under way
        ends first (its waits end at once) and none starts after."""
        self._stop.set()
        with self._fault, contextlib.ExitStack() as parts:
            # Callbacks run last first: the database goes after the services using it.
            parts.callback(self.pg.stop)
            if self.relay is not None:
                parts.callback(self.relay.down)
            if self.broker is not None:
                parts.callback(self.broker.stop)
            for service in self.services().values():
                parts.callback(service.stop)
            if self._store_client is not None:
                parts.callback(self._store_client.disconnect)
                parts.callback(self._store_client.loop_stop)
