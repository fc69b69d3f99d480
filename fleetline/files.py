"""Where fleetline finds the files it ships beside its code: the SQL migrations, the
broker's config and the auth plugin's source.

In a source checkout (or an editable install) they are in the checkout. A built package
carries them as data files under ``share/fleetline/`` of its installation prefix
(pyproject.toml, ``[tool.setuptools.data-files]``), found through the installed
distribution's file list, so nothing depends on where the package was installed from.
"""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
_SHARED = "share/fleetline/"


class ProjectFileError(FileNotFoundError):
    """A file fleetline ships is neither in a checkout nor among the installed data."""


@functools.cache
def _installed() -> dict[str, Path]:
    """Installed data files by their path under ``share/fleetline/``."""
    try:
        dist = importlib.metadata.distribution("fleetline")
    except importlib.metadata.PackageNotFoundError:
        return {}
    found: dict[str, Path] = {}
    for file in dist.files or ():
        posix = file.as_posix()
        at = posix.find(_SHARED)
        if at >= 0:
            found[posix[at + len(_SHARED) :]] = Path(str(dist.locate_file(file))).resolve()
    return found


@functools.cache
def _in_checkout() -> bool:
    """Whether the package runs from fleetline's own source tree (not site-packages, where
    another distribution's top-level ``migrations/`` could sit beside it)."""
    try:
        return 'name = "fleetline"' in (CHECKOUT / "pyproject.toml").read_text()
    except OSError:
        return False


def project_path(relative: str) -> Path:
    """The file or folder ``relative`` (as in the repository: ``migrations``,
    ``deploy/mosquitto/fleetline.conf``) of this installation."""
    checkout = CHECKOUT / relative
    if _in_checkout() and checkout.exists():
        return checkout
    installed = _installed()
    if relative in installed:
        return installed[relative]
    prefix = relative.rstrip("/") + "/"
    for name, path in installed.items():
        if name.startswith(prefix):  # a folder: the one holding its files
            return path.parents[name.count("/") - prefix.count("/")]
    raise ProjectFileError(
        f"{relative} is neither in a source checkout ({checkout}) nor among the installed "
        "package's data files (share/fleetline/): reinstall fleetline"
    )
