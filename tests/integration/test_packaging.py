"""The package as a user installs it: built into a wheel and installed under another
prefix, it finds its migrations, broker config and auth plugin source among its data
files, builds the plugin outside any source tree and runs a local broker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_SOURCES = ["pyproject.toml", "README.md", "fleetline", "fleetline_cli", "fleetline_dev",
                   "services", "migrations", "deploy/mosquitto", "firmware/common",
                   "firmware/esp32", "firmware/esp8266", "firmware/pyboard",
                   "scripts/build-timescaledb.sh"]
IGNORED = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so", "node_modules")

CHECK = """
import sys
from pathlib import Path
import fleetline, fleetline_dev
from fleetline.files import project_path
from fleetline.migrate import load_migrations, migrations_dir
from fleetline_dev.embedded import LocalMosquitto, auth_plugin_path

site, checkout = Path(sys.argv[1]), Path(sys.argv[2])
for module in (fleetline, fleetline_dev):
    assert Path(module.__file__).is_relative_to(site), module.__file__
print("migrations", migrations_dir(), len(load_migrations()))
print("conf", project_path("deploy/mosquitto/fleetline.conf"))
print("firmware", project_path("firmware/esp32/board.py"))
print("timescaledb", project_path("scripts/build-timescaledb.sh"))
plugin = auth_plugin_path()
assert not plugin.is_relative_to(checkout), plugin
print("plugin", plugin)
with LocalMosquitto(Path(sys.argv[3])) as broker:
    print("broker", broker.port)
"""


def run(args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_an_installed_package_finds_its_files_and_builds_outside_the_source_tree(
    tmp_path: Path,
) -> None:
    # Built from a copy of what the package is made of: a build leaves build/ behind.
    source = tmp_path / "source"
    for name in PACKAGE_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=IGNORED)
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)])
    [wheel] = tmp_path.glob("fleetline-*.whl")
    prefix = tmp_path / "prefix"
    # --ignore-installed: without it pip would uninstall the development install first.
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
         "--ignore-installed", "-q", "--prefix", str(prefix), str(wheel)])
    site = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = site / "site-packages"
    env = {**os.environ, "PYTHONPATH": str(site), "FLEETLINE_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("FLEETLINE_MIGRATIONS_DIR", None)
    out = run([sys.executable, "-c", CHECK, str(site), str(ROOT), str(tmp_path / "broker")],
              env=env, cwd=tmp_path)
    found = dict(line.split(" ", 1) for line in out.splitlines())
    shared = prefix / "share" / "fleetline"
    assert Path(found["migrations"].split()[0]) == shared / "migrations"
    assert int(found["migrations"].split()[1]) == len(list((ROOT / "migrations").glob("*.sql")))
    assert Path(found["conf"]) == shared / "deploy" / "mosquitto" / "fleetline.conf"
    assert Path(found["firmware"]) == shared / "firmware" / "esp32" / "board.py"
    assert Path(found["timescaledb"]) == shared / "scripts" / "build-timescaledb.sh"
    assert Path(found["plugin"]).is_relative_to(tmp_path / "cache")
    assert int(found["broker"]) > 0
