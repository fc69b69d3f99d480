"""What the benchmarks of the API's jobs share (bench/jobs.py, bench/rollout.py): the
services run as production runs them, the simulated fleet in a child process, a probe of
the API from another client, and an admin client that pages through lists and follows
jobs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from measure import log, stop_process

from fleetline import apikeys
from fleetline_dev.embedded import LocalPostgres, free_port

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PROBE_INTERVAL_SECONDS = 0.1
WAIT_SECONDS = 0.05  # between looks at a probe's last answer
RUN_TIMEOUT_SECONDS = 600.0
STOP_TIMEOUT_SECONDS = 30.0
PAGE = 1000
DEVICES_LOG = "devices.log"

Fleet = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


# -- the database -----------------------------------------------------------------------


def query_value(url: str, query: str, *args: object) -> Any:
    """One value from the database, over a connection of its own."""

    async def fetch() -> Any:
        con = await asyncpg.connect(url)
        try:
            return await con.fetchval(query, *args)
        finally:
            await con.close()

    return asyncio.run(fetch())


def admin_key(url: str) -> str:
    async def create() -> str:
        con = await asyncpg.connect(url)
        try:
            token: str = (await apikeys.create_key(con, name="bench", scopes=["admin"])).token
            return token
        finally:
            await con.close()

    return asyncio.run(create())


def count_online(url: str, prefix: str) -> int:
    """Devices named ``prefix...`` that ingest recorded as online."""
    return int(
        query_value(
            url,
            "SELECT count(*) FROM device_status WHERE online AND device_id LIKE $1",
            prefix + "%",
        )
    )


def environment(pg: LocalPostgres, url: str) -> dict[str, Any]:
    mosquitto = "Mosquitto"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=5)
        mosquitto = (out.stdout or out.stderr).splitlines()[0].strip()
    return {
        "postgres": str(query_value(url, "SHOW server_version")),
        "mosquitto": mosquitto,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_start": tuple(round(x, 2) for x in os.getloadavg()),
        "pg_pid": pg.pid,
    }


# -- processes --------------------------------------------------------------------------


class Service:
    """`python -m fleetline_cli <name>` as a child process, ready when /readyz answers 200."""

    def __init__(self, name: str, env: dict[str, str], port: int, workdir: Path) -> None:
        self.name = name
        self.env = env
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fleetline_cli", self.name],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        deadline = time.monotonic() + 60
        while self.get("/readyz") != 200:
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not get ready; log {self.log}")
            time.sleep(0.05)

    def get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def metrics(self, path: str = "/metrics") -> dict[str, float]:
        """The service's Prometheus metrics, each name's samples summed over its labels
        (histograms by their _sum, _count and _bucket names); {} if it does not answer."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        found: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            name = name.split("{", 1)[0]
            with contextlib.suppress(ValueError):
                found[name] = found.get(name, 0.0) + float(value)
        return found

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, STOP_TIMEOUT_SECONDS)


def service_env(database_url: str) -> dict[str, str]:
    """What every service of a benchmark runs with, before its own settings."""
    return {
        **os.environ,
        "FLEETLINE_DATABASE_URL": database_url,
        "FLEETLINE_LOG_LEVEL": "WARNING",
        "FLEETLINE_LOG_FORMAT": "json",
        "FLEETLINE_STORAGE_TIMESCALE": "off",
    }


def _consumer(name: str, workdir: Path, env: dict[str, str], client_id: str) -> Service:
    """Ingest or rules: its health port, on 127.0.0.1, and its MQTT client id."""
    port, prefix = free_port(), f"FLEETLINE_{name.upper()}"
    env = {
        **env,
        f"{prefix}_HTTP_HOST": "127.0.0.1",
        f"{prefix}_HTTP_PORT": str(port),
        f"{prefix}_CLIENT_ID": client_id,
    }
    return Service(name, env, port, workdir)


def ingest_service(workdir: Path, env: dict[str, str], *, client_id: str) -> Service:
    return _consumer("ingest", workdir, env, client_id)


def rules_service(workdir: Path, env: dict[str, str], *, client_id: str) -> Service:
    return _consumer("rules", workdir, env, client_id)


def api_service(
    workdir: Path, env: dict[str, str], *, key_secret: str, settings: list[str]
) -> Service:
    """The API; ``settings`` (--api-env's KEY=VALUE) come last, over all the others."""
    port = free_port()
    env = {
        **env,
        "FLEETLINE_API_HOST": "127.0.0.1",
        "FLEETLINE_API_PORT": str(port),
        "FLEETLINE_API_METRICS_PORT": str(free_port()),
        "FLEETLINE_API_RATE_PER_KEY": "0",  # the bench is the one client
        "FLEETLINE_DEVICE_KEY_SECRET": key_secret,
        **dict(kv.split("=", 1) for kv in settings),
    }
    return Service("api", env, port, workdir)


def add_api_env(p: argparse.ArgumentParser) -> None:
    def setting(kv: str) -> str:
        if "=" not in kv:
            raise argparse.ArgumentTypeError("takes KEY=VALUE")
        return kv

    p.add_argument(
        "--api-env",
        action="append",
        default=[],
        type=setting,
        metavar="KEY=VALUE",
        help="extra environment for the API, e.g. FLEETLINE_API_JOBS_POOL_SIZE=16",
    )


@contextlib.contextmanager
def workdir(prefix: str, *, keep: bool) -> Iterator[Path]:
    """A temporary directory for the run's servers, logs and files; removed unless ``keep``."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(tmp, 0o755)
    log(f"temporary directory {tmp}")
    try:
        yield tmp
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def serve_fleet(fleet: Fleet) -> None:
    """The body of the devices' child process: ``fleet(stop)`` (the simulator) until
    SIGTERM or SIGINT sets ``stop``."""

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await fleet(stop)

    asyncio.run(run())


class Stack:
    """The processes a benchmark runs besides the database and the broker: the services
    and the simulated fleet (a child process of the benchmark's own script). Leaving it,
    or stop(), stops the fleet, then the services in reverse."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.services: list[Service] = []
        self.fleet: subprocess.Popen[bytes] | None = None

    def start(self, *services: Service) -> None:
        self.services = list(services)
        for svc in self.services:
            svc.start()

    def start_fleet(self, script: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.workdir / DEVICES_LOG).open("ab") as out:
            self.fleet = subprocess.Popen(
                [sys.executable, script, *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )
        return self.fleet

    def wait_online(self, url: str, *, prefix: str, devices: int, timeout_seconds: float) -> None:
        deadline = time.monotonic() + timeout_seconds
        while (n := count_online(url, prefix)) < devices:
            if self.fleet is not None and self.fleet.poll() is not None:
                raise RuntimeError(
                    f"the simulated devices exited; log {self.workdir / DEVICES_LOG}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {n} of {devices} devices came online")
            time.sleep(0.5)
        log(f"{devices:,} devices online (ingest recorded their status)")

    def check_alive(self) -> None:
        for svc in self.services:
            svc.check_alive()

    def stop(self) -> None:
        if self.fleet is not None:
            stop_process(self.fleet, STOP_TIMEOUT_SECONDS)
        for svc in reversed(self.services):
            svc.stop()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


# -- the API ----------------------------------------------------------------------------


class Prober:
    """GET ``path`` every PROBE_INTERVAL_SECONDS from its own thread and client: what
    another user of the API sees meanwhile. With ``keep``, the last answer is kept (a
    job's progress, which a benchmark can follow instead of polling on its own)."""

    def __init__(self, client: httpx.Client, path: str, *, keep: bool = False) -> None:
        self.client = client
        self.path = path
        self.keep = keep
        self.ms: list[float] = []
        self.errors = 0
        self.last: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-prober", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            try:
                r = self.client.get(self.path)
            except httpx.HTTPError:
                self.errors += 1
            else:
                if r.status_code == 200:
                    self.ms.append((time.perf_counter() - t) * 1000)
                    if self.keep:
                        self.last = r.json()
                else:
                    self.errors += 1
            self._stop.wait(PROBE_INTERVAL_SECONDS)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def __enter__(self) -> Prober:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class JobsBench:
    """A benchmark of the API's jobs: its admin client, the jobs it creates and follows,
    and the problems it finds (devices that did not end as expected)."""

    def __init__(
        self,
        args: argparse.Namespace,
        *,
        api_url: str,
        key: str,
        db_url: str,
        stack: Stack,
        **client_options: Any,
    ) -> None:
        self.args = args
        self.api_url = api_url
        self.db_url = db_url
        self.stack = stack
        self.headers = {"Authorization": f"Bearer {key}"}
        self.client = self.api_client(**client_options)
        self.problems: list[str] = []

    def api_client(self, **options: Any) -> httpx.Client:
        """A client with the admin key; ``options`` go to httpx.Client (limits)."""
        return httpx.Client(base_url=self.api_url, headers=self.headers, timeout=60, **options)

    def problem(self, text: str) -> None:
        log(f"PROBLEM: {text}")
        self.problems.append(text)

    def _pages(self, get: Callable[[dict[str, Any]], httpx.Response]) -> list[dict[str, Any]]:
        """Every item of a list, a page at a time: ``get`` takes the limit and cursor."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            paging: dict[str, Any] = {"limit": PAGE}
            if cursor:
                paging["cursor"] = cursor
            r = get(paging)
            r.raise_for_status()
            page = r.json()
            items += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return items

    def matches(self, query: str) -> list[dict[str, Any]]:
        """Every device the query matches, as a client lists them."""
        return self._pages(
            lambda paging: self.client.post("/v1/query", json={"query": query, **paging})
        )

    def job_devices(self, job_id: int) -> list[dict[str, Any]]:
        return self._pages(
            lambda paging: self.client.get(f"/v1/jobs/{job_id}/devices", params=paging)
        )

    def create_job(self, body: dict[str, Any]) -> tuple[dict[str, Any], float, float]:
        """POST /v1/jobs: the job, when it was posted (epoch s) and how long it took (ms)."""
        t0 = time.time()
        r = self.client.post("/v1/jobs", json=body)
        create_ms = (time.time() - t0) * 1000
        if r.status_code != 201:
            raise RuntimeError(f"POST /v1/jobs: {r.status_code} {r.text}")
        job: dict[str, Any] = r.json()
        return job, t0, create_ms

    def wait_job(
        self,
        job_id: int,
        *,
        job: dict[str, Any] | None = None,
        probe: Prober | None = None,
        poll_seconds: float = 0.25,
        get_ms: list[float] | None = None,
        timeout_seconds: float = RUN_TIMEOUT_SECONDS,
    ) -> dict[str, Any]:
        """The job once it is no longer queued or running: from the probe's answers when
        it probes this job (no extra load), else from ``job`` (the POST's answer) and a GET
        every ``poll_seconds``, each GET's time appended to ``get_ms``."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            if probe is not None:
                job = probe.last
            if job is not None and job["id"] == job_id:
                if job["finished_at"] or job["state"] not in ("queued", "running"):
                    return job
            if time.monotonic() > deadline:
                shown = job["progress"] if job is not None else "no answer"
                raise RuntimeError(f"job {job_id} did not finish: {shown}")
            self.stack.check_alive()
            if probe is not None:
                time.sleep(WAIT_SECONDS)
                continue
            time.sleep(poll_seconds)
            t = time.perf_counter()
            r = self.client.get(f"/v1/jobs/{job_id}")
            if get_ms is not None:
                get_ms.append((time.perf_counter() - t) * 1000)
            r.raise_for_status()
            job = r.json()

    def finish(
        self, name: str, text: str, figures: dict[str, Any], *, env: dict[str, Any], started: float
    ) -> None:
        """Print the report, save it with ``figures`` to bench/results/<name>-<time>.json,
        and exit 1 if any device did not end as expected."""
        print()
        print(text)
        out_dir = BENCH_DIR / "results"
        out_dir.mkdir(exist_ok=True)
        out = out_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()}
        record = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "args": args,
            "environment": env,
            **figures,
            "problems": self.problems,
            "report": text,
            "total_seconds": time.time() - started,
        }
        out.write_text(json.dumps(record, indent=1, default=str))
        print(f"\ntotal {time.time() - started:.0f} s; results: {out.relative_to(ROOT)}")
        if self.problems:
            print(f"\n{len(self.problems)} PROBLEM(S): not every device ended as expected:")
            for problem in self.problems:
                print(f"  {problem}")
            sys.exit(1)
