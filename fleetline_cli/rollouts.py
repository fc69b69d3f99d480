"""``fleetline rollout``: firmware rollouts (jobs of type ``rollout``, docs/ota.md), over
the REST API (FLEETLINE_API_URL, FLEETLINE_API_KEY)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from fleetline_cli.common import (
    JsonOption,
    Output,
    OutputOption,
    api,
    api_items,
    fail,
    print_table,
    printed,
)
from fleetline_cli.jobs import OUTCOMES, watch

rollout_app = typer.Typer(
    help="Firmware rollouts: a release put on the devices a query matches, in waves (docs/ota.md).",
    no_args_is_help=True,
)

RolloutId = Annotated[int, typer.Argument(help="The rollout's job id.")]
Watch = Annotated[
    bool, typer.Option("--watch", "-w", help="Follow it with a progress bar until it stops.")
]


def _summary(job: dict[str, Any]) -> str:
    p = job["progress"]
    counts = ", ".join(f"{p[k]} {k.replace('_', ' ')}" for k in OUTCOMES if p[k])
    return f"rollout {job['id']}: {job['state']}, {p['percent']:g}% of {p['total']}" + (
        f" ({counts})" if counts else ""
    )


def _show(job: dict[str, Any]) -> None:
    r = job["rollout"]
    typer.echo(_summary(job))
    typer.echo(f"  firmware {r['firmware_id']} ({r['kind']} {r['version']}), query {job['query']}")
    waves = f"waves of {r['wave_size']}" if r["wave_size"] else "the rest in one wave"
    typer.echo(
        f"  canary {r['canary']}, then {waves}; at most {job['batch_size']} at once; stops "
        f"({r['on_failure']}) past {r['failure_threshold_percent']:g}% failed"
    )
    if r["window"]:
        typer.echo(f"  window {r['window']['start']}-{r['window']['end']} UTC")
    updating = {k: v for k, v in r["phases"].items() if v}
    if updating:
        typer.echo("  updating: " + ", ".join(f"{v} {k}" for k, v in updating.items()))
    if job["error"]:
        typer.echo(f"  {job['error']}")


def _watch(rollout_id: int) -> dict[str, Any]:
    """A progress bar until the rollout finishes or pauses; the rollout then."""

    def detail(job: dict[str, Any]) -> str:
        p = job["progress"]
        phases = job["rollout"]["phases"]
        updating = ", ".join(f"{v} {k}" for k, v in phases.items() if v)
        return f"{p['succeeded']} ok, {p['failed'] + p['rolled_back']} failed" + (
            f"; {updating}" if updating else ""
        )

    return watch(rollout_id, f"rollout {rollout_id}", detail)


def _window(text: str | None) -> dict[str, str] | None:
    if text is None:
        return None
    start, sep, end = text.partition("-")
    if not sep:
        raise typer.BadParameter("HH:MM-HH:MM (UTC)", param_hint="--window")
    return {"start": start, "end": end}


@rollout_app.command("create")
def rollout_create(
    firmware_id: Annotated[int, typer.Argument(help="The release (`fleetline firmware upload`).")],
    query: Annotated[str, typer.Option(help="The devices, e.g. \"tags.site = 'A'\".")],
    canary: Annotated[int, typer.Option(help="Devices in the first wave.")] = 1,
    canary_percent: Annotated[
        float | None, typer.Option(help="The first wave as a percentage instead.")
    ] = None,
    wave_size: Annotated[
        int | None, typer.Option(help="Devices per wave after it (default: the rest at once).")
    ] = None,
    max_updating: Annotated[int, typer.Option(help="Devices updating at once, at most.")] = 10,
    threshold: Annotated[
        float, typer.Option(help="Stop past this percentage of finished devices failing.")
    ] = 10.0,
    on_failure: Annotated[str, typer.Option(help="pause or abort at the threshold.")] = "pause",
    window: Annotated[
        str | None, typer.Option(help="Notify devices only in HH:MM-HH:MM (UTC).")
    ] = None,
    watch: Watch = False,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Put a release on the devices QUERY matches: a canary first, then waves."""
    body: dict[str, Any] = {
        "type": "rollout",
        "query": query,
        "firmware_id": firmware_id,
        "canary": canary,
        "wave_size": wave_size,
        "batch_size": max_updating,
        "failure_threshold_percent": threshold,
        "on_failure": on_failure,
        "window": _window(window),
    }
    if canary_percent is not None:
        body["canary_percent"] = canary_percent
    job = api("POST", "/v1/jobs", json=body)
    if watch:
        job = _watch(job["id"])
    if not printed(job, output, as_json):
        _show(job)


@rollout_app.command("list")
def rollout_list(
    state: Annotated[str | None, typer.Option(help="queued, running, paused, completed...")] = None,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Rollouts, newest first."""
    jobs = [j for j in api_items("/v1/jobs", state=state) if j["type"] == "rollout"]
    if printed(jobs, output, as_json):
        return
    print_table(
        ["id", "firmware", "state", "done", *OUTCOMES[:3], "created"],
        [
            [
                j["id"],
                f"{j['rollout']['firmware_id']} ({j['rollout']['version']})",
                j["state"],
                f"{j['progress']['percent']:g}% of {j['progress']['total']}",
                *(j["progress"][k] for k in OUTCOMES[:3]),
                j["created_at"],
            ]
            for j in jobs
        ],
    )


@rollout_app.command("show")
def rollout_show(
    rollout_id: RolloutId,
    watch: Watch = False,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """A rollout's options and progress."""
    job = api("GET", f"/v1/jobs/{rollout_id}")
    if job["type"] != "rollout":
        fail(f"job {rollout_id} is a {job['type']} job, not a rollout (`fleetline job show`)")
    if watch:
        job = _watch(rollout_id)
    if not printed(job, output, as_json):
        _show(job)


@rollout_app.command("devices")
def rollout_devices(
    rollout_id: RolloutId,
    state: Annotated[
        str | None, typer.Option(help="pending, running, succeeded, failed, rolled_back...")
    ] = None,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Each device's part: its wave, phase, download progress, and why it failed."""
    rows = api_items(f"/v1/jobs/{rollout_id}/devices", state=state)
    if printed(rows, output, as_json):
        return
    print_table(
        ["device", "wave", "state", "phase", "progress", "error"],
        [
            [
                r["device_id"],
                r["wave"],
                r["state"],
                r["phase"],
                f"{r['progress']}%" if r["progress"] is not None else None,
                r["error"] or r["refused_report"],
            ]
            for r in rows
        ],
    )


def _act(rollout_id: int, verb: str, output: Output) -> None:
    job = api("POST", f"/v1/jobs/{rollout_id}/{verb}")
    if not printed(job, output):
        typer.echo(_summary(job))


@rollout_app.command("pause")
def rollout_pause(rollout_id: RolloutId, output: OutputOption = Output.table) -> None:
    """Start no more devices (those updating go on)."""
    _act(rollout_id, "pause", output)


@rollout_app.command("resume")
def rollout_resume(rollout_id: RolloutId, output: OutputOption = Output.table) -> None:
    """Go on; the failure threshold counts from now."""
    _act(rollout_id, "resume", output)


@rollout_app.command("cancel")
def rollout_cancel(rollout_id: RolloutId, output: OutputOption = Output.table) -> None:
    """Cancel the devices not started (those updating go on)."""
    _act(rollout_id, "cancel", output)
