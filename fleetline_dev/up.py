"""``fleetline up``: the whole system on one machine, for development and demos.

Database and broker are embedded (:mod:`fleetline_dev.embedded`) unless
FLEETLINE_DATABASE_URL / FLEETLINE_MQTT_URL say where they are. Then the migrations run,
the three services start as child processes, and a simulated fleet publishes telemetry
(devices of their own, and gateways publishing for their children when asked).
Ctrl-C (or SIGTERM) stops everything in reverse order: the simulator, the services (they
flush on SIGTERM), then the broker and the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg
import typer
from pydantic import ValidationError

from fleetline import devicekeys, releases
from fleetline.logs import setup_logging
from fleetline.migrate import MigrationError, migrate
from fleetline.settings import (
    MqttTarget,
    ServiceSettings,
    StorageSettings,
    parse_mqtt_url,
    redact_url,
)
from fleetline_dev.certs import ensure_local_ca, machine_names, outward_address
from fleetline_dev.embedded import (
    BrokerAuth,
    EmbeddedError,
    LocalMosquitto,
    LocalPostgres,
    ensure_timescaledb,
    find_mosquitto,
    free_port,
    port_is_free,
    psql_command,
)
from fleetline_dev.simulated_gateways import (
    gateway_ids,
    register_gateways,
    run_devices_and_gateways,
)
from fleetline_dev.simulated_updates import UpdatePolicy
from fleetline_dev.simulator import device_ids, register_fleet

log = logging.getLogger(__name__)

SERVICES = ("ingest", "api", "rules")
# In the data folder once its database was started with TimescaleDB preloaded.
TIMESCALEDB_MARKER = "timescaledb"
POSTGRES_PORT = 54329
MOSQUITTO_PORT = 18830
# The devices' listener: MQTT over TLS, on every interface so boards on the network reach it.
MOSQUITTO_TLS_PORT = 8883
DATABASE = "fleetline"
API_PORT = 8000
API_METRICS_PORT = 9102
# The API's devices' HTTPS listener (firmware downloads), beside the broker's TLS one.
API_DEVICE_PORT = 8443
INGEST_HTTP_PORT = 9101
RULES_HTTP_PORT = 9103
# The banner waits this long for the services to answer /readyz.
SERVICES_READY_TIMEOUT_SECONDS = 60.0
SERVICE_STOP_TIMEOUT_SECONDS = 20.0
SIMULATOR_STOP_TIMEOUT_SECONDS = 10.0
# The simulator starts once ingest is subscribed (its /readyz), so the first readings
# are not published to nobody; after this long it starts anyway.
INGEST_READY_TIMEOUT_SECONDS = 30.0

MOSQUITTO_MISSING = (
    "mosquitto is not installed. Install the Debian package: apt-get install mosquitto "
    "(`make run` does it), or point FLEETLINE_MQTT_URL at a broker."
)


def device_key_secret(base: Path) -> str:
    """FLEETLINE_DEVICE_KEY_SECRET, else this data directory's own (made on first run):
    device keys stay valid across restarts of ``up``."""
    configured = os.environ.get("FLEETLINE_DEVICE_KEY_SECRET")
    if configured:
        return configured
    path = base / "device-key-secret"
    if not path.exists():
        base.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
    return path.read_text().strip()


def release_key_file(base: Path) -> str:
    """FLEETLINE_API_RELEASE_KEY_FILE, else this data directory's own release key (made on
    first run), so that firmware releases can be made and keep their signer."""
    configured = os.environ.get("FLEETLINE_API_RELEASE_KEY_FILE")
    if configured:
        return configured
    path = base / "release-key.pem"
    if not path.exists():
        base.mkdir(parents=True, exist_ok=True)
        releases.write_key(path, releases.generate_key())
    return str(path)


# Taken by this run already (a port picked free stays free until its server binds it).
_PICKED: set[int] = set()


def _pick_port(preferred: int) -> int:
    """``preferred`` when it is free, else a free port (each port picked once a run)."""
    port = preferred
    while port in _PICKED or not port_is_free(port):
        port = free_port()
    _PICKED.add(port)
    return port


# The services' own ports: the variable that sets each and its default. Set and taken is
# an error (said before anything starts); unset, the default or else a free port.
SERVICE_PORTS = {
    "FLEETLINE_API_PORT": API_PORT,
    "FLEETLINE_API_METRICS_PORT": API_METRICS_PORT,
    "FLEETLINE_INGEST_HTTP_PORT": INGEST_HTTP_PORT,
    "FLEETLINE_RULES_HTTP_PORT": RULES_HTTP_PORT,
}
# ...and the API's devices' HTTPS listener, beside the embedded broker's TLS one.
DEVICE_PORTS = {"FLEETLINE_API_DEVICE_PORT": API_DEVICE_PORT}
# Set to 0, these mean "on the API's own port" (FLEETLINE_API_METRICS_PORT: /metrics).
ZERO_ALLOWED = {"FLEETLINE_API_METRICS_PORT"}


class PortError(Exception):
    """A port the environment asks for is in use or not a port."""


def plan_service_ports(
    environ: dict[str, str], defaults: dict[str, int] = SERVICE_PORTS
) -> dict[str, int]:
    """Each service port by its variable: as the environment sets it (which must be free),
    else its default when free, else a free one."""
    ports: dict[str, int] = {}
    for name, default in defaults.items():
        configured = environ.get(name, "").strip()
        if not configured:
            ports[name] = _pick_port(default)
            continue
        try:
            port = int(configured)
        except ValueError:
            raise PortError(f"{name}={configured!r} is not a port number") from None
        if port == 0 and name in ZERO_ALLOWED:
            ports[name] = 0
            continue
        if not 0 < port < 65536:
            raise PortError(f"{name}={port} is not a port number (1-65535)")
        if port in _PICKED or not port_is_free(port):
            raise PortError(
                f"port {port} ({name}) is in use: stop what listens there, or set {name} "
                "to another port (unset, fleetline up picks a free one)"
            )
        _PICKED.add(port)
        ports[name] = port
    return ports


# Ctrl-C, kill, and the terminal going away (closing its window sends SIGHUP): each
# stops everything in order.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _say(text: str, *, err: bool = False) -> None:
    """typer.echo that survives a vanished terminal (after SIGHUP writes fail)."""
    with contextlib.suppress(OSError):
        typer.echo(text, err=err)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _trap_signals() -> None:
    """Outside the event loop every stop signal unwinds as KeyboardInterrupt (even a
    SIGINT inherited as ignored), so the servers already started are stopped.

    (Needed again after each ``asyncio.run``: closing the loop resets the handlers.)
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)


def _timescaledb_ready(data_dir: Path) -> bool:
    """TimescaleDB built into the embedded PostgreSQL (the first run builds it, showing
    its progress); False, said in one line, when it cannot be: then plain PostgreSQL. A
    data folder that already stores on TimescaleDB cannot go on without it: EmbeddedError.
    """
    marker = data_dir / TIMESCALEDB_MARKER
    if os.environ.get("FLEETLINE_STORAGE_TIMESCALE", "auto") == "off" and not marker.exists():
        return False
    try:
        ensure_timescaledb(lambda line: _say(f"  {line}"))
    except EmbeddedError as exc:
        if marker.exists():
            raise EmbeddedError(
                f"this data folder stores on TimescaleDB, which cannot be built: {exc}"
            ) from exc
        _say(f"TimescaleDB unavailable ({exc}); storing on plain PostgreSQL")
        return False
    data_dir.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


def run_up(
    *,
    devices: int,
    interval_seconds: float,
    data_dir: str,
    gateways: int = 0,
    children_per_gateway: int = 10,
) -> int:
    try:
        settings = ServiceSettings()
    except ValidationError as exc:
        _say(f"error: invalid settings:\n{exc}", err=True)
        return 2
    setup_logging("up", level=settings.log_level, fmt=settings.log_format)
    # paho logs every socket error of every simulated device; the simulator logs its own.
    logging.getLogger("mqtt").setLevel(logging.CRITICAL)

    database_url = os.environ.get("FLEETLINE_DATABASE_URL")
    mqtt_url = os.environ.get("FLEETLINE_MQTT_URL")
    if not mqtt_url and find_mosquitto() is None:
        _say(f"error: {MOSQUITTO_MISSING}", err=True)
        return 1
    base = Path(data_dir).resolve()
    _PICKED.clear()
    try:
        # Before anything starts: a port asked for and taken is one line, not a traceback
        # of a service after the banner.
        ports = plan_service_ports(dict(os.environ))
        if not mqtt_url:
            ports |= plan_service_ports(dict(os.environ), DEVICE_PORTS)
    except PortError as exc:
        _say(f"error: {exc}", err=True)
        return 1
    try:
        key_secret = device_key_secret(base)
        devicekeys.check_secret(key_secret.encode())
    except (OSError, devicekeys.DeviceKeyError) as exc:
        _say(f"error: device-key secret: {exc}", err=True)
        return 1
    try:
        # The api's (the child processes take this environment).
        os.environ["FLEETLINE_API_RELEASE_KEY_FILE"] = release_key_file(base)
    except releases.ReleaseError as exc:
        _say(f"error: release key: {exc}", err=True)
        return 1
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    _trap_signals()
    pg_started = False
    try:
        with contextlib.ExitStack() as servers:
            if not database_url:
                pg_started = True
                pg = LocalPostgres(
                    base / "postgres",
                    port=_pick_port(POSTGRES_PORT),
                    timescaledb=_timescaledb_ready(base),
                )
                servers.enter_context(pg)
                database_url = pg.url_for(DATABASE)
            try:
                asyncio.run(migrate(database_url, StorageSettings(), create_database=True))
                sim_keys = asyncio.run(
                    register_fleet(database_url, device_ids(devices), key_secret.encode())
                )
                sim_keys |= asyncio.run(
                    register_gateways(
                        database_url,
                        gateway_ids(gateways) if gateways > 0 else [],
                        key_secret.encode(),
                        children=children_per_gateway,
                    )
                )
            except MigrationError as exc:
                _say(f"error: migrations failed: {exc}", err=True)
                return 1
            except (OSError, asyncpg.PostgresError) as exc:
                _say(f"error: database {redact_url(database_url)}: {exc}", err=True)
                return 1
            service_urls: dict[str, str] = {}
            devices_target = None
            if not mqtt_url:
                # After the migrations: the broker's auth plugin reads the device registry.
                # Devices log in with their keys, each service with its own account.
                passwords = {name: secrets.token_urlsafe(24) for name in SERVICES}
                auth = BrokerAuth(
                    database_url,
                    key_secret.encode(),
                    services={f"fleetline-{name}": pw for name, pw in passwords.items()},
                )
                # Services use the plain listener on loopback; devices the TLS one,
                # verifying it against this data directory's own CA.
                try:
                    tls = ensure_local_ca(base / "tls", machine_names())
                except (OSError, ValueError) as exc:
                    raise EmbeddedError(f"cannot make the broker's TLS certificate: {exc}") from exc
                broker = LocalMosquitto(
                    base / "mosquitto",
                    port=_pick_port(MOSQUITTO_PORT),
                    auth=auth,
                    tls=tls,
                    tls_port=_pick_port(MOSQUITTO_TLS_PORT),
                    tls_bind="0.0.0.0",
                )
                servers.enter_context(broker)
                mqtt_url = broker.url
                devices_target = DevicesEndpoint(
                    url=f"mqtts://{device_host()}:{broker.tls_port}",
                    local_url=broker.tls_url,
                    ca_file=str(tls.ca_cert),
                    https_port=ports.pop("FLEETLINE_API_DEVICE_PORT"),
                    cert_file=str(tls.server_cert),
                    key_file=str(tls.server_key),
                )
                service_urls = {
                    name: f"mqtt://fleetline-{name}:{pw}@127.0.0.1:{broker.port}"
                    for name, pw in passwords.items()
                }
            _trap_signals()
            code = asyncio.run(
                _supervise(
                    database_url,
                    mqtt_url,
                    base=base,
                    ports=ports,
                    embedded_database=pg_started,
                    service_urls=service_urls,
                    devices_target=devices_target,
                    key_secret=key_secret,
                    sim_keys=sim_keys,
                    devices=devices,
                    gateways=gateways,
                    children_per_gateway=children_per_gateway,
                    interval_seconds=interval_seconds,
                )
            )
            _trap_signals()
            return code
    except KeyboardInterrupt:
        # Interrupted while starting (or signalled again while stopping the servers).
        return 0
    except EmbeddedError as exc:
        _say(f"error: {exc}", err=True)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class DevicesEndpoint:
    """Where devices reach the embedded broker: ``url`` for devices on the network (in
    connection strings), ``local_url`` for the simulator on this machine, and the CA
    file both verify the broker against; the API's devices' HTTPS listener (firmware
    downloads) on ``https_port``, with the broker's certificate."""

    url: str
    local_url: str
    ca_file: str
    https_port: int
    cert_file: str
    key_file: str


def device_host() -> str:
    """The address devices on the network use for this machine (else loopback)."""
    return outward_address() or "127.0.0.1"


def _child_env(
    database_url: str,
    mqtt_url: str,
    key_secret: str,
    devices: DevicesEndpoint | None,
    ports: dict[str, int],
) -> dict[str, str]:
    env = dict(os.environ)
    env.update({name: str(port) for name, port in ports.items()})
    env["FLEETLINE_DATABASE_URL"] = database_url
    env["FLEETLINE_MQTT_URL"] = mqtt_url
    env["FLEETLINE_DEVICE_KEY_SECRET"] = key_secret
    if devices is not None:
        # Connection strings name the TLS listener.
        env.setdefault("FLEETLINE_API_DEVICE_MQTT_URL", devices.url)
        env.setdefault("FLEETLINE_API_DEVICE_PORT", str(devices.https_port))
        env.setdefault("FLEETLINE_API_DEVICE_TLS_CERT_FILE", devices.cert_file)
        env.setdefault("FLEETLINE_API_DEVICE_TLS_KEY_FILE", devices.key_file)
    # The services listen on loopback, as the banner says (devices reach the broker's
    # TLS listener, which is on every interface); set these to serve beyond it.
    for name in (
        "FLEETLINE_API_HOST",
        "FLEETLINE_API_METRICS_HOST",
        "FLEETLINE_INGEST_HTTP_HOST",
        "FLEETLINE_RULES_HTTP_HOST",
    ):
        env.setdefault(name, "127.0.0.1")
    if sys.stderr.isatty():
        env.setdefault("FLEETLINE_LOG_FORMAT", "console")
    return env


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


async def _http_ok(port: int, path: str) -> bool:
    try:
        async with asyncio.timeout(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
                await writer.drain()
                status = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return status.split(b" ")[1:2] == [b"200"]


async def _wait_ingest_ready(port: int, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + INGEST_READY_TIMEOUT_SECONDS
    while loop.time() < deadline:
        if stop.is_set() or await _http_ok(port, "/readyz"):
            return
        await asyncio.sleep(0.25)
    log.warning(
        "ingest is not ready after %.0f s; starting the simulator anyway",
        INGEST_READY_TIMEOUT_SECONDS,
    )


async def _wait_services_ready(
    ports: dict[str, int], exits: dict[asyncio.Task[int], str], stop: asyncio.Event
) -> list[str]:
    """Until every service answers ``/readyz``, one exits, we are stopped or
    SERVICES_READY_TIMEOUT_SECONDS pass: the services not ready then (none: all are)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SERVICES_READY_TIMEOUT_SECONDS
    waiting = dict(ports)
    while waiting and not stop.is_set() and not any(task.done() for task in exits):
        for name, port in list(waiting.items()):
            if await _http_ok(port, "/readyz"):
                del waiting[name]
        if not waiting or loop.time() > deadline:
            break
        await asyncio.sleep(0.1)
    return sorted(waiting)


def _cli_command() -> str:
    """How to run this installation's ``fleetline``: relative to the current folder when
    it is inside it (``.venv/bin/fleetline``)."""
    exe = Path(sys.executable).parent / "fleetline"
    if not exe.exists():
        return "fleetline"
    with contextlib.suppress(ValueError):
        return str(exe.relative_to(Path.cwd()))
    return str(exe)


def write_env_file(path: Path, values: dict[str, str]) -> None:
    """The deployment's addresses for the command line (``fleetline_cli/localenv.py``
    reads them): one ``NAME=value`` a line, readable by its owner only (a database URL
    may hold a password)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # one left by a run that died keeps its mode otherwise
    with os.fdopen(fd, "w") as out:
        out.write("# Written by `fleetline up` while it runs; removed when it stops.\n")
        out.writelines(f"{name}={value}\n" for name, value in values.items())
    os.replace(staging, path)


def _banner(
    *,
    database_url: str,
    storage: str,
    broker_lines: str,
    api_url: str,
    ports: dict[str, int],
    fleet: str,
    env_file: Path,
    embedded_database: bool,
) -> str:
    """What ``up`` prints once every service is ready: where each part is, and how to make
    the first API key (the command line finds this deployment through ``env_file``)."""
    default_env = Path.cwd() / ".fleetline" / "env"
    prefix = "" if env_file == default_env else f"FLEETLINE_ENV_FILE={env_file} "
    psql = f"{psql_command()} {redact_url(database_url)}" if embedded_database else None
    api_metrics_port = ports["FLEETLINE_API_METRICS_PORT"]
    api_metrics = (
        f"http://127.0.0.1:{api_metrics_port}/metrics" if api_metrics_port else f"{api_url}/metrics"
    )
    return (
        "\nfleetline is up\n"
        f"  API       {api_url}\n"
        f"  dashboard {api_url}/dashboard/\n"
        f"  API docs  {api_url}/docs (Swagger UI), {api_url}/redoc\n"
        f"  database  {redact_url(database_url)}\n"
        + (f"  psql      {psql}\n" if psql else "")
        + f"  storage   {storage}\n"
        f"{broker_lines}"
        f"  metrics   http://127.0.0.1:{ports['FLEETLINE_INGEST_HTTP_PORT']}/metrics (ingest), "
        f"{api_metrics} (api),\n"
        f"            http://127.0.0.1:{ports['FLEETLINE_RULES_HTTP_PORT']}/metrics (rules)\n"
        f"  devices   {fleet}\n"
        "make an API key (for the API, the dashboard and the command line):\n"
        f"  {prefix}{_cli_command()} apikey create --scope admin\n"
        "Ctrl-C to stop.\n"
    )


async def _storage_label(database_url: str) -> str:
    """What stores the readings, for the banner."""
    con = await asyncpg.connect(database_url)
    try:
        version = await con.fetchval(
            "SELECT e.extversion FROM storage_config c"
            " LEFT JOIN pg_extension e ON e.extname = 'timescaledb' WHERE c.timescale"
        )
    finally:
        await con.close()
    if version:
        return f"TimescaleDB {version} (hypertable, compression, retention)"
    return "PostgreSQL partitions (TimescaleDB not in use)"


async def _start_simulator(
    target: MqttTarget,
    *,
    keys: dict[str, str],
    devices: int,
    gateways: int,
    children_per_gateway: int,
    interval_seconds: float,
    ingest_port: int,
    stop: asyncio.Event,
    updates: UpdatePolicy | None,
) -> None:
    await _wait_ingest_ready(ingest_port, stop)
    if stop.is_set():
        return
    await run_devices_and_gateways(
        target,
        devices=devices,
        gateways=gateways,
        children_per_gateway=children_per_gateway,
        interval_seconds=interval_seconds,
        stop=stop,
        keys=keys,
        updates=updates,
    )


def _updates(devices_target: DevicesEndpoint | None) -> UpdatePolicy | None:
    """The simulated fleet takes rollouts of releases signed by this run's release key,
    downloading from the API's devices' listener."""
    if devices_target is None:
        return None
    key = releases.load_key(Path(os.environ["FLEETLINE_API_RELEASE_KEY_FILE"]))
    return UpdatePolicy(
        release_key=releases.public_point(key), ca_file=Path(devices_target.ca_file)
    )


async def _supervise(
    database_url: str,
    mqtt_url: str,
    *,
    base: Path,
    ports: dict[str, int],
    embedded_database: bool,
    service_urls: dict[str, str],
    devices_target: DevicesEndpoint | None,
    key_secret: str,
    sim_keys: dict[str, str],
    devices: int,
    gateways: int,
    children_per_gateway: int,
    interval_seconds: float,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            hurry.set()  # a second Ctrl-C: do not wait for the services
        else:
            stop.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal)

    env = _child_env(database_url, mqtt_url, key_secret, devices_target, ports)
    ingest_port = ports["FLEETLINE_INGEST_HTTP_PORT"]
    api_url = f"http://127.0.0.1:{ports['FLEETLINE_API_PORT']}"
    env_file = base / "env"
    wrote_env = False
    sim_target = (
        parse_mqtt_url(devices_target.local_url, ca_file=devices_target.ca_file)
        if devices_target is not None
        else parse_mqtt_url(mqtt_url)
    )
    procs: dict[str, asyncio.subprocess.Process] = {}
    exits: dict[asyncio.Task[int], str] = {}
    sim_stop = asyncio.Event()
    sim: asyncio.Task[None] | None = None
    code = 0
    try:
        for name in SERVICES:
            # A process group of its own: a Ctrl-C on the terminal reaches only us, and
            # we stop the services before the broker and the database they use.
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "fleetline_cli",
                    name,
                    stdin=asyncio.subprocess.DEVNULL,
                    env={**env, "FLEETLINE_MQTT_URL": service_urls.get(name, mqtt_url)},
                    process_group=0,
                )
            except OSError as exc:
                _say(f"error: cannot start service {name}: {exc}", err=True)
                return 1
            procs[name] = proc
            exits[asyncio.create_task(proc.wait(), name=f"up.wait[{name}]")] = name
            log.info("started %s (pid %d)", name, proc.pid)

        # The banner once the services answer, so what it names can be used at once.
        service_ports = {
            "api": ports["FLEETLINE_API_PORT"],
            "ingest": ingest_port,
            "rules": ports["FLEETLINE_RULES_HTTP_PORT"],
        }
        not_ready = await _wait_services_ready(service_ports, exits, stop)
        if stop.is_set():
            return 0
        exited = [name for waited, name in exits.items() if waited.done()]
        if exited or not_ready:
            for waited, name in exits.items():
                if waited.done():
                    _say(
                        f"error: service {name} exited while starting "
                        f"({_describe_exit(waited.result())}; its log is above)",
                        err=True,
                    )
            if not exited:
                _say(
                    f"error: not ready after {SERVICES_READY_TIMEOUT_SECONDS:.0f} s: "
                    f"{', '.join(not_ready)} (their logs are above); stopping",
                    err=True,
                )
            return 1
        fleet = (
            f"{devices} simulated, one reading every {interval_seconds:g} s"
            if devices > 0
            else "none simulated (--devices 0)"
        )
        if gateways > 0:
            fleet += (
                f"; {gateways} simulated gateway{'s' if gateways > 1 else ''} "
                f"({', '.join(gateway_ids(gateways)[:3])}{', ...' if gateways > 3 else ''}) "
                f"with {children_per_gateway} children each"
            )
        broker_lines = (
            f"  broker    {redact_url(mqtt_url)} (services)\n"
            f"            {devices_target.url} (devices: TLS, verify with the CA file\n"
            f"            {devices_target.ca_file})\n"
            f"  downloads https://{device_host()}:{devices_target.https_port} (devices: "
            "firmware updates)\n"
            if devices_target is not None
            else f"  broker    {redact_url(mqtt_url)}\n"
        )
        storage = await _storage_label(database_url)
        local = {"FLEETLINE_DATABASE_URL": database_url, "FLEETLINE_API_URL": api_url}
        if devices_target is not None:
            local["FLEETLINE_DEVICE_MQTT_URL"] = devices_target.url
            local["FLEETLINE_DEVICE_CA_FILE"] = devices_target.ca_file
        write_env_file(env_file, local)
        wrote_env = True
        _say(
            _banner(
                database_url=database_url,
                storage=storage,
                broker_lines=broker_lines,
                api_url=api_url,
                ports=ports,
                fleet=fleet,
                env_file=env_file,
                embedded_database=embedded_database,
            )
        )
        if devices > 0 or gateways > 0:
            sim = asyncio.create_task(
                _start_simulator(
                    sim_target,
                    keys=sim_keys,
                    devices=devices,
                    gateways=gateways,
                    children_per_gateway=children_per_gateway,
                    interval_seconds=interval_seconds,
                    ingest_port=ingest_port,
                    stop=sim_stop,
                    updates=_updates(devices_target),
                ),
                name="up.simulator",
            )
        stopping = asyncio.create_task(stop.wait(), name="up.stop")
        watched: set[asyncio.Future[Any]] = {stopping, *exits}
        if sim is not None:
            watched.add(sim)
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        for task in done:
            if task in exits:
                name = exits[task]
                _say(
                    f"error: service {name} exited unexpectedly ({_describe_exit(task.result())})",
                    err=True,
                )
                code = 1
            elif task is sim:
                error = task.exception()
                if error is not None:
                    _say(f"error: the simulator failed: {error!r}", err=True)
                    code = 1
        if code == 0:
            _say("stopping...")
    finally:
        if wrote_env:  # not another run's, on the same data directory
            with contextlib.suppress(FileNotFoundError):
                env_file.unlink()
        await _stop_simulator(sim, sim_stop)
        await _stop_services(procs, hurry)
    return code


async def _stop_simulator(sim: asyncio.Task[None] | None, sim_stop: asyncio.Event) -> None:
    if sim is None or sim.done():
        return
    sim_stop.set()
    try:
        async with asyncio.timeout(SIMULATOR_STOP_TIMEOUT_SECONDS):
            await asyncio.shield(sim)
    except TimeoutError:
        sim.cancel()
    except Exception:
        log.exception("the simulator failed while stopping")
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await sim


async def _stop_services(
    procs: dict[str, asyncio.subprocess.Process], hurry: asyncio.Event
) -> None:
    running = {name: p for name, p in procs.items() if p.returncode is None}
    for name, proc in running.items():
        log.info("stopping %s (pid %d)", name, proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    if not running:
        return
    waits = asyncio.gather(*(p.wait() for p in running.values()))
    hurried = asyncio.ensure_future(hurry.wait())
    either: set[asyncio.Future[Any]] = {waits, hurried}
    try:
        await asyncio.wait(
            either,
            timeout=SERVICE_STOP_TIMEOUT_SECONDS,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        hurried.cancel()
    for name, proc in running.items():
        if proc.returncode is None:
            log.warning("%s did not stop in time; killing it", name)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    await waits
    for name, proc in running.items():
        if proc.returncode not in (0, -signal.SIGTERM):
            log.warning("%s stopped with %s", name, _describe_exit(proc.returncode or 0))
