"""The settings of the deployment ``fleetline up`` runs, found without extra variables.

While it runs, ``fleetline up`` writes ``<data dir>/env`` (``./.fleetline/env`` by
default) and deletes it when it stops: one ``NAME=value`` a line, no quotes, ``#``
starting a comment; the names are FLEETLINE_DATABASE_URL, FLEETLINE_API_URL,
FLEETLINE_DEVICE_MQTT_URL and FLEETLINE_DEVICE_CA_FILE. At start the command line reads
the ``.fleetline/env`` of the current directory or of the nearest parent that has one
(FLEETLINE_ENV_FILE names another file; set to nothing, no file is read) and sets each
variable the environment does not set already: the environment wins.

Only those four names are taken from the file, and only from a file of the user's own
that no one else may write: a file planted in a shared or cloned folder could otherwise
point the command line, with its API key or database password, at a server of someone
else's (or set a proxy). A file found and refused is said on stderr once.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import MutableMapping
from pathlib import Path

ENV_FILE_VARIABLE = "FLEETLINE_ENV_FILE"
DATA_DIR = ".fleetline"
FILE_NAME = "env"
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What `fleetline up` writes, and all that is taken from the file.
NAMES = frozenset(
    {
        "FLEETLINE_DATABASE_URL",
        "FLEETLINE_API_URL",
        "FLEETLINE_DEVICE_MQTT_URL",
        "FLEETLINE_DEVICE_CA_FILE",
    }
)


# The variables the last load set, and the file each came from (for error messages).
_ORIGINS: dict[str, Path] = {}


class LocalEnvError(Exception):
    """The file FLEETLINE_ENV_FILE names cannot be read."""


def origin(name: str) -> Path | None:
    """The env file that set ``name``, if one did."""
    return _ORIGINS.get(name)


def hint(name: str) -> str:
    """What says where ``name`` points: the variable, or the env file that set it."""
    source = origin(name)
    if source is None:
        return f"{name} says where it is"
    return (
        f"{name} came from {source}, which a running `fleetline up` writes (is it still "
        "running?); set the variable to override it"
    )


def parse(text: str) -> dict[str, str]:
    """``NAME=value`` lines; blank lines, comments and lines without a name are skipped."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if sep and NAME.fullmatch(name):
            values[name] = value.strip()
    return values


def find(start: Path | None = None) -> Path | None:
    """``.fleetline/env`` in ``start`` (the current directory) or its nearest parent
    that has one."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / DATA_DIR / FILE_NAME
        if candidate.is_file():
            return candidate
    return None


def env_file(environ: MutableMapping[str, str], start: Path | None = None) -> Path | None:
    """The file to read: FLEETLINE_ENV_FILE's (none when it is set to nothing), else the
    one found from ``start``."""
    if ENV_FILE_VARIABLE in environ:
        named = environ[ENV_FILE_VARIABLE].strip()
        return Path(named) if named else None
    return find(start)


def untrusted(path: Path) -> str | None:
    """Why the file at ``path`` is not to be read (another user's, or writable by others),
    or None."""
    info = path.stat()
    if info.st_uid != os.getuid():
        return "it belongs to another user"
    if info.st_mode & 0o022:
        return "others may write it (chmod go-w)"
    return None


def load(environ: MutableMapping[str, str] | None = None, start: Path | None = None) -> Path | None:
    """Set the variables of the deployment's env file that ``environ`` (the process's
    environment) does not set; the file read, if any."""
    target = os.environ if environ is None else environ
    _ORIGINS.clear()
    path = env_file(target, start)
    if path is None:
        return None
    try:
        text = path.read_text()
        refusal = untrusted(path)
    except OSError as exc:
        if ENV_FILE_VARIABLE in target:
            raise LocalEnvError(
                f"{ENV_FILE_VARIABLE} names {path}, which cannot be read ({exc.strerror}); "
                "unset it, or set it to nothing to read no file"
            ) from None
        return None  # it went between finding and reading: `up` stopped
    if refusal:
        print(f"warning: {path} not read: {refusal}", file=sys.stderr)  # noqa: T201
        return None
    for name, value in parse(text).items():
        if name in NAMES and name not in target:
            target[name] = value
            _ORIGINS[name] = path
    return path
