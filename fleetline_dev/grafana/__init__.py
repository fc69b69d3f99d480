"""fleetline's Grafana dashboards as code (Grafana's foundation SDK), rendered to the
JSON files Grafana provisions from deploy/grafana/dashboards/:

    python -m fleetline_dev.grafana          # write the files
    python -m fleetline_dev.grafana --check  # fail if a file differs from the code

Every panel reads the stable views (docs/grafana.md) with Grafana's PostgreSQL macros;
tests/integration/test_grafana.py expands each query as Grafana does and runs it with
data on plain PostgreSQL and on TimescaleDB.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder

from fleetline_dev.grafana import alarms, device, fleet, ingest

# File name (in deploy/grafana/dashboards/) -> the dashboard's builder.
DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "fleet.json": fleet.build,
    "device.json": device.build,
    "alarms.json": alarms.build,
    "ingest.json": ingest.build,
}


def render(build: Callable[[], Dashboard]) -> str:
    """The dashboard as Grafana's provisioning reads it, stable across runs."""
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def panel_sql(build: Callable[[], Dashboard], title: str) -> str:
    """The SQL of the panel titled ``title`` in a dashboard, as its file holds it."""
    panels = json.loads(render(build))["panels"]
    return next(str(p["targets"][0]["rawSql"]) for p in panels if p["title"] == title)


def write(directory: Path, *, check: bool = False) -> list[str]:
    """Write every dashboard into ``directory``; with ``check``, write nothing and return
    the files that differ from the code."""
    stale = []
    if not check:
        directory.mkdir(parents=True, exist_ok=True)
    for name, build in DASHBOARDS.items():
        path = directory / name
        text = render(build)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    return stale
