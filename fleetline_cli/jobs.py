"""``fleetline job``: a direct method or a desired-properties patch for every device a
query matches (``/v1/jobs``), followed with a progress bar; rollouts, jobs of their own
kind, have ``fleetline rollout``. Over the REST API (FLEETLINE_API_URL, FLEETLINE_API_KEY)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

import typer

from fleetline_cli.common import (
    JsonOption,
    Output,
    OutputOption,
    api,
    api_items,
    compact,
    document_argument,
    print_table,
    printed,
)

job_app = typer.Typer(
    help="Jobs: a method or a twin patch for every device a query matches.",
    no_args_is_help=True,
)
# A job's states after which nothing changes any more.
FINISHED = ("completed", "cancelled", "failed")
WATCH_SECONDS = 0.5
# A job's devices by final state, as its progress counts them.
OUTCOMES = ("succeeded", "failed", "rolled_back", "cancelled")

JobId = Annotated[int, typer.Argument(help="The job's id.")]


def watch(job_id: int, label: str, detail: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """A progress bar (on stderr: what the command prints stays alone on stdout) until
    the job finishes or pauses, or Ctrl-C stops watching (the job goes on); the job then."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("{task.fields[label]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(label, total=None, label=label, detail="")
        job: dict[str, Any] = api("GET", f"/v1/jobs/{job_id}")
        try:
            while True:
                p = job["progress"]
                done = sum(p[k] for k in OUTCOMES)
                bar.update(task, total=p["total"], completed=done, detail=detail(job))
                if job["state"] in FINISHED or job["state"] == "paused":
                    return job
                time.sleep(WATCH_SECONDS)
                job = api("GET", f"/v1/jobs/{job_id}")
        except KeyboardInterrupt:
            return job


def _what(job: dict[str, Any]) -> str:
    if job["type"] == "method" and job.get("method"):
        return f"method {job['method']['name']}"
    if job["type"] == "twin":
        return f"twin patch {compact(job.get('patch'), 40)}"
    if job["type"] == "rollout" and job.get("rollout"):
        return f"rollout of firmware {job['rollout']['firmware_id']}"
    return str(job["type"])


def summary(job: dict[str, Any]) -> str:
    p = job["progress"]
    counts = ", ".join(f"{p[k]} {k.replace('_', ' ')}" for k in OUTCOMES if p[k])
    return f"job {job['id']} ({_what(job)}): {job['state']}, {p['percent']:g}% of {p['total']}" + (
        f" ({counts})" if counts else ""
    )


def _detail(job: dict[str, Any]) -> str:
    p = job["progress"]
    return f"{p['succeeded']} ok, {p['failed']} failed, {p['running']} running"


def _show(job: dict[str, Any]) -> None:
    typer.echo(summary(job))
    rate = f", {job['max_per_second']:g} a second" if job["max_per_second"] else ""
    typer.echo(f"  query {job['query']}; {job['batch_size']} at once{rate}")
    if job["type"] == "method" and job.get("method"):
        m = job["method"]
        typer.echo(f"  params {compact(m['params'])}, {m['timeout_s']} s to answer")
    typer.echo(f"  created {job['created_at']} by {job['created_by'] or '-'}")
    if job["finished_at"]:
        typer.echo(f"  finished {job['finished_at']}")
    if job["error"]:
        typer.echo(f"  {job['error']}")


Wait = Annotated[
    bool,
    typer.Option("--wait", "--watch", "-w", help="Follow it with a progress bar until it ends."),
]


@job_app.command("create")
def job_create(
    query: Annotated[str, typer.Option(help="The devices, e.g. \"tags.site = 'A'\".")],
    method: Annotated[
        str | None, typer.Option(help="A method job: the method each device is called with.")
    ] = None,
    params: Annotated[
        str | None,
        typer.Option(help="With --method: its params, a JSON object (@FILE or - to read one)."),
    ] = None,
    timeout: Annotated[
        int, typer.Option(help="With --method: seconds each device has to answer.")
    ] = 30,
    patch: Annotated[
        str | None,
        typer.Option(
            help="A twin job: a JSON merge patch of each device's desired properties "
            "(@FILE or - to read one)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Devices run at once, at most.")] = 10,
    max_per_second: Annotated[
        float | None, typer.Option(help="Devices started per second, at most.")
    ] = None,
    wait: Wait = False,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Call a method on (--method), or patch the desired twin of (--patch), every device
    QUERY matches now; the job runs in the background (--wait follows it)."""
    if (method is None) == (patch is None):
        raise typer.BadParameter("give --method NAME or --patch JSON (one of them)")
    body: dict[str, Any] = {
        "query": query,
        "batch_size": batch_size,
        "max_per_second": max_per_second,
    }
    if method is not None:
        call_params = document_argument(params, "--params") if params is not None else {}
        if not isinstance(call_params, dict):
            raise typer.BadParameter("must be a JSON object ({...})", param_hint="--params")
        body |= {
            "type": "method",
            "method": {"name": method, "params": call_params, "timeout_s": timeout},
        }
    else:
        assert patch is not None
        doc = document_argument(patch, "--patch")
        if not isinstance(doc, dict):
            raise typer.BadParameter("must be a JSON object ({...})", param_hint="--patch")
        body |= {"type": "twin", "patch": doc}
    job = api("POST", "/v1/jobs", json=body)
    if wait:
        job = watch(job["id"], f"job {job['id']}", _detail)
    if not printed(job, output, as_json):
        _show(job)


@job_app.command("show")
def job_show(
    job_id: JobId,
    watch_it: Wait = False,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """A job and its progress (--watch: until it ends)."""
    job = api("GET", f"/v1/jobs/{job_id}")
    if watch_it:
        job = watch(job_id, f"job {job_id}", _detail)
    if not printed(job, output, as_json):
        _show(job)


@job_app.command("list")
def job_list(
    state: Annotated[
        str | None, typer.Option(help="queued, running, paused, completed, cancelled, failed")
    ] = None,
    job_type: Annotated[str | None, typer.Option("--type", help="method, twin or rollout")] = None,
    limit: Annotated[int, typer.Option(min=1, help="The newest this many, at most.")] = 100,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Jobs, newest first, with their progress."""
    jobs = api_items("/v1/jobs", at_most=limit, state=state)
    if job_type:
        jobs = [j for j in jobs if j["type"] == job_type]
    if printed(jobs, output, as_json):
        return
    print_table(
        ["id", "type", "what", "state", "done", "succeeded", "failed", "created"],
        [
            [
                j["id"],
                j["type"],
                _what(j).removeprefix(f"{j['type']} "),
                j["state"],
                f"{j['progress']['percent']:g}% of {j['progress']['total']}",
                j["progress"]["succeeded"],
                j["progress"]["failed"],
                j["created_at"],
            ]
            for j in jobs
        ],
    )


@job_app.command("devices")
def job_devices(
    job_id: JobId,
    state: Annotated[
        str | None, typer.Option(help="pending, running, succeeded, failed, cancelled...")
    ] = None,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Each device's outcome: its state, status, reason and error."""
    rows = api_items(f"/v1/jobs/{job_id}/devices", state=state)
    if printed(rows, output, as_json):
        return
    print_table(
        ["device", "state", "status", "reason", "result", "error"],
        [
            [
                r["device_id"],
                r["state"],
                r["status"],
                r["reason"],
                compact(r["result"], 40) if r["result"] is not None else None,
                r["error"],
            ]
            for r in rows
        ],
    )


@job_app.command("cancel")
def job_cancel(
    job_id: JobId, output: OutputOption = Output.table, as_json: JsonOption = False
) -> None:
    """Cancel a job: its pending devices are cancelled, those running finish."""
    job = api("POST", f"/v1/jobs/{job_id}/cancel")
    if not printed(job, output, as_json):
        typer.echo(summary(job))
