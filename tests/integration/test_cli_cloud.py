"""The command line's twin, method, c2d and job verbs against the running API, with
devices on the real broker; run in-process (typer's runner), as a user types them."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import orjson
import paho.mqtt.client as paho
import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from fleetline_cli.main import app
from fleetline_dev.embedded import LocalMosquitto
from tests.integration.test_methods import MethodDevice
from tests.support import ApiProcess, Device

pytestmark = pytest.mark.integration

Cli = Callable[..., Result]


def runner_for(env: dict[str, str]) -> Cli:
    """``fleetline ARGS`` in this process; no .fleetline/env is read (FLEETLINE_ENV_FILE
    set to nothing)."""
    runner = CliRunner()

    def run(*args: str, stdin: str | None = None) -> Result:
        return runner.invoke(app, list(args), input=stdin,
                             env={**env, "FLEETLINE_ENV_FILE": ""}, catch_exceptions=False)

    return run


@pytest.fixture
async def cli(api: ApiProcess, make_key: Callable[..., Any]) -> Cli:
    return runner_for({"FLEETLINE_API_URL": api.url, "FLEETLINE_API_KEY": await make_key("admin")})


@pytest.fixture
async def online(db: asyncpg.Pool[Any]) -> AsyncIterator[Callable[..., Any]]:
    """Register devices marked online (as ingest marks them); offline again afterwards, so
    no later test calls a device that is gone."""
    marked: list[str] = []

    async def mark(*ids: str, tags: dict[str, str] | None = None) -> list[str]:
        await db.execute(
            "INSERT INTO devices (id, tags) SELECT unnest($1::text[]), $2::text::jsonb",
            list(ids), json.dumps(tags or {}))
        await db.execute(
            "INSERT INTO device_activity (device_id, last_seen, online, status_changed_at) "
            "SELECT unnest($1::text[]), now(), true, now()", list(ids))
        marked.extend(ids)
        return list(ids)

    yield mark
    await db.execute("UPDATE device_activity SET online = false WHERE device_id = ANY($1)", marked)


@pytest.fixture
def answering(broker: LocalMosquitto) -> Iterator[Callable[[str], MethodDevice]]:
    """Devices on the broker that answer every method with its name and params."""
    made: list[MethodDevice] = []

    def make(device_id: str) -> MethodDevice:
        made.append(MethodDevice(broker.url, device_id))
        return made[-1]

    yield make
    for dev in made:
        dev.close()


@pytest.fixture
def module_answering(broker: LocalMosquitto) -> Iterator[Callable[[str], None]]:
    """Devices on the broker whose modules answer every method on the module's own topic
    (docs/protocol.md, section 8) with the module's id, the method and its params."""
    made: list[Device] = []

    def make(device_id: str) -> None:
        dev = Device(broker.url, device_id)
        made.append(dev)

        def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            body = orjson.loads(msg.payload)
            payload = {"module": msg.topic.split("/")[3], "method": body["method"],
                       **body["params"]}
            dev.client.publish(msg.topic.removesuffix("req") + "res",
                               orjson.dumps({"status": 200, "payload": payload}), qos=1)

        subscribed = threading.Event()
        dev.client.on_message = on_message
        dev.client.on_subscribe = lambda *_a: subscribed.set()
        dev.client.subscribe(f"devices/{device_id}/modules/+/methods/+/req", qos=1)
        assert subscribed.wait(10), "the device's subscription was not acknowledged"

    yield make
    for dev in made:
        dev.close()


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def failed(result: Result, *texts: str) -> str:
    """The one error line of a command that failed with exit code 1."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


async def test_twin_show_and_update_with_etags(cli: Cli, online: Any, uid: str) -> None:
    [device] = await online(f"{uid}-t", tags={"site": uid})
    shown = ok(cli("twin", "show", device)).stdout.splitlines()
    assert shown[0] == f"twin of {device} (tags site={uid})"
    assert shown[1].startswith('desired v0 (etag "0"), changed never')
    updated = ok(cli("twin", "update", device, "--desired", '{"interval_s": 10, "mode": "eco"}',
                     "--etag", "0", "-o", "json"))
    twin = json.loads(updated.stdout)
    assert twin["desired"] == {"interval_s": 10, "mode": "eco"} and twin["desired_version"] == 1
    assert twin["delta"] == twin["desired"]
    # A stale etag is refused, saying where to get the current one.
    failed(cli("twin", "update", device, "--desired", '{"mode": "max"}', "--etag", "0"),
           "412", "`fleetline twin show` gives the etag")
    # A patch from stdin, in YAML: null removes a member.
    ok(cli("twin", "update", device, "--desired", "-", "--etag", '"1"', stdin="mode: null\n"))
    as_yaml = yaml.safe_load(ok(cli("twin", "show", device, "-o", "yaml")).stdout)
    assert as_yaml["desired"] == {"interval_s": 10} and as_yaml["desired_version"] == 2
    assert as_yaml["tags"] == {"site": uid}
    text = ok(cli("twin", "show", device)).stdout
    assert 'desired v2 (etag "2")' in text and '"interval_s": 10' in text
    assert "delta (desired, not reported yet)" in text
    bad = cli("twin", "update", device, "--desired", "[1]")
    assert bad.exit_code == 2 and "JSON object" in bad.stderr
    failed(cli("twin", "show", f"{uid}-none"), "404 Not Found", f"{uid}-none")


async def test_method_invoke_prints_the_devices_answer(
    cli: Cli, online: Any, answering: Callable[[str], MethodDevice], uid: str
) -> None:
    [device] = await online(f"{uid}-m")
    answering(device)
    result = ok(cli("method", "invoke", device, "ping", "--params", '{"n": 3}', "--timeout", "5",
                    "-o", "yaml"))
    answer = yaml.safe_load(result.stdout)
    assert answer["status"] == 200 and answer["payload"] == {"method": "ping", "n": 3}
    text = ok(cli("method", "invoke", device, "reboot")).stdout.splitlines()
    assert text[0] == "status 200" and '"method": "reboot"' in "\n".join(text)
    [quiet] = await online(f"{uid}-q")
    failed(cli("method", "invoke", quiet, "ping", "--timeout", "1"), "504")
    failed(cli("method", "invoke", f"{uid}-none", "ping"), "404")


async def test_modules_created_listed_shown_called_and_deleted(
    cli: Cli, online: Any, module_answering: Callable[[str], None], uid: str
) -> None:
    [device] = await online(f"{uid}-mod")
    made = ok(cli("module", "create", device, "relay")).stdout.splitlines()
    assert made[0].startswith(f"module relay of {device}, created ")
    env = json.loads(ok(cli("module", "create", device, "env", "-o", "json")).stdout)
    assert env["device_id"] == device and env["module_id"] == "env" and env["created_at"]
    # One registered already is shown as it is.
    again = yaml.safe_load(ok(cli("module", "create", device, "env", "-o", "yaml")).stdout)
    assert again == env
    listed = ok(cli("module", "list", device)).stdout.splitlines()
    assert listed[0].split() == ["module", "created"]
    assert [line.split()[0] for line in listed[1:]] == ["env", "relay"]
    assert [m["module_id"] for m in json.loads(ok(cli("module", "list", device, "--json")).stdout)
            ] == ["env", "relay"]
    shown = yaml.safe_load(ok(cli("module", "show", device, "env", "-o", "yaml")).stdout)
    assert shown == env
    # Its twin is its own, not the device's.
    ok(cli("twin", "update", device, "--module", "env", "--desired", '{"unit": "C"}'))
    twin = ok(cli("twin", "show", device, "--module", "env")).stdout.splitlines()
    assert twin[0] == f"twin of {device} module env"
    module_twin = json.loads(ok(cli("twin", "show", device, "--module", "env", "-o", "json")
                                ).stdout)
    assert module_twin["module_id"] == "env" and module_twin["desired"] == {"unit": "C"}
    assert json.loads(ok(cli("twin", "show", device, "--json")).stdout)["desired"] == {}
    # A method reaches the module, on its own topic.
    module_answering(device)
    called = yaml.safe_load(ok(cli("method", "invoke", device, "switch", "--module", "relay",
                                   "--params", '{"on": true}', "--timeout", "5", "-o", "yaml")
                               ).stdout)
    assert called["status"] == 200
    assert called["payload"] == {"module": "relay", "method": "switch", "on": True}
    text = ok(cli("method", "invoke", device, "ping", "--module", "env", "--timeout", "5"))
    assert text.stdout.splitlines()[0] == "status 200" and '"module": "env"' in text.stdout
    failed(cli("method", "invoke", device, "ping", "--module", "ghost", "--timeout", "1"),
           "404 Not Found", f"module {device}/ghost not found")
    assert ok(cli("module", "delete", device, "env")).stdout == f"deleted module env of {device}\n"
    failed(cli("module", "show", device, "env"), "404 Not Found", f"module {device}/env")
    failed(cli("twin", "show", device, "--module", "env"), "404 Not Found")
    failed(cli("module", "delete", device, "env"), "404 Not Found")
    assert [m["module_id"] for m in yaml.safe_load(
        ok(cli("module", "list", device, "-o", "yaml")).stdout)] == ["relay"]
    failed(cli("module", "list", f"{uid}-none"), "404 Not Found", f"{uid}-none")


async def test_c2d_send_list_show_cancel(cli: Cli, db: asyncpg.Pool[Any], uid: str) -> None:
    device = f"{uid}-c"
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device)
    sent = json.loads(ok(cli("c2d", "send", device, '{"cmd": "open"}', "--property", "prio=high",
                             "--ttl", "600", "--json")).stdout)
    assert sent["state"] == "queued" and sent["body"] == {"cmd": "open"}
    assert sent["properties"] == {"prio": "high"}
    text = ok(cli("c2d", "send", device, "hello there", "--text")).stdout
    assert text.startswith("message ") and f"for {device}: queued" in text
    assert 'body "hello there"' in text
    listed = ok(cli("c2d", "list", device)).stdout.splitlines()
    assert listed[0].split() == ["id", "state", "sent", "created", "expires", "finished", "body"]
    assert [line.split()[:3] for line in listed[1:]] == [
        [line.split()[0], "queued", "0"] for line in listed[1:]]
    assert listed[2].split()[0] == sent["id"]  # newest first
    cancelled = ok(cli("c2d", "cancel", device, sent["id"])).stdout
    assert f"message {sent['id']} for {device}: cancelled" in cancelled
    history = ok(cli("c2d", "show", device, sent["id"])).stdout
    assert "queued" in history and "cancelled by" in history
    only = yaml.safe_load(
        ok(cli("c2d", "list", device, "--state", "cancelled", "-o", "yaml")).stdout)
    assert [m["id"] for m in only] == [sent["id"]]
    failed(cli("c2d", "cancel", device, sent["id"]), "409 Conflict", "is cancelled")
    bad = cli("c2d", "send", device, "{oops")
    assert bad.exit_code == 2 and "not JSON" in bad.stderr


async def test_jobs_created_watched_listed_and_cancelled(
    cli: Cli, online: Any, answering: Callable[[str], MethodDevice], uid: str
) -> None:
    ids = await online(f"{uid}-0", f"{uid}-1", tags={"run": uid})
    for device in ids:
        answering(device)
    query = f"tags.run = '{uid}'"
    made = ok(cli("job", "create", "--query", query, "--method", "ping", "--params", '{"x": 1}',
                  "--timeout", "5", "--wait"))
    assert "2/2" in made.stderr  # the progress bar, on stderr
    summary = made.stdout.splitlines()[0]
    assert summary.startswith("job ")
    assert summary.endswith("(method ping): completed, 100% of 2 (2 succeeded)")
    job_id = summary.split()[1]
    devices = ok(cli("job", "devices", job_id)).stdout.splitlines()
    assert devices[0].split() == ["device", "state", "status", "reason", "result", "error"]
    assert sorted(line.split()[:4] for line in devices[1:]) == [
        [d, "succeeded", "200", "answered"] for d in ids]
    twin = json.loads(ok(cli("job", "create", "--query", query, "--patch", '{"interval_s": 5}',
                             "--wait", "-o", "json")).stdout)
    assert twin["type"] == "twin" and twin["state"] == "completed"
    assert twin["progress"]["succeeded"] == 2 and twin["patch"] == {"interval_s": 5}
    shown = yaml.safe_load(ok(cli("job", "show", str(twin["id"]), "--watch", "-o", "yaml")).stdout)
    assert shown["id"] == twin["id"] and shown["state"] == "completed"
    listed = ok(cli("job", "list", "--type", "twin", "--limit", "20")).stdout.splitlines()
    assert listed[0].split() == ["id", "type", "what", "state", "done", "succeeded", "failed",
                                 "created"]
    assert any(line.split()[:2] == [str(twin["id"]), "twin"] for line in listed[1:])
    desired = json.loads(ok(cli("twin", "show", ids[0], "--json")).stdout)["desired"]
    assert desired == {"interval_s": 5}
    # A job cancelled while it runs (one device started every 20 s: the second is still
    # pending): its pending devices are cancelled.
    running = json.loads(ok(cli("job", "create", "--query", query, "--method", "ping",
                                "--batch-size", "1", "--max-per-second", "0.05",
                                "-o", "json")).stdout)
    assert running["state"] in ("queued", "running")
    cancelled = ok(cli("job", "cancel", str(running["id"]))).stdout
    assert cancelled.startswith(f"job {running['id']} (method ping): cancelled, "), cancelled
    shown = json.loads(ok(cli("job", "show", str(running["id"]), "-o", "json")).stdout)
    assert shown["state"] == "cancelled" and shown["cancelled_by"]
    assert shown["progress"]["pending"] == 0 and shown["progress"]["cancelled"] >= 1
    failed(cli("job", "cancel", str(running["id"])), "409 Conflict", "cancelled already")
    # A job that matches nothing finishes at once; cancelling it then is refused.
    empty = json.loads(ok(cli("job", "create", "--query", f"tags.run = '{uid}-none'",
                              "--method", "ping", "--json")).stdout)
    assert empty["state"] == "completed" and empty["progress"]["total"] == 0
    failed(cli("job", "cancel", str(empty["id"])), "409 Conflict", "completed")
    both = cli("job", "create", "--query", query)
    assert both.exit_code == 2 and "--method NAME or --patch JSON" in both.stderr
    failed(cli("job", "create", "--query", f"tags.run = '{uid}' AND", "--method", "ping"),
           "400 Bad Request", "at position")
