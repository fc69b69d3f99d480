"""How the command line finds its deployment and says what went wrong: the
``.fleetline/env`` that `fleetline up` writes (found from the current directory or a
parent; the environment wins), FLEETLINE_ENV_FILE, the device endpoint it names, the
-o forms, and one-line errors that say what to do. In-process (typer's runner: its
``env`` also undoes what the file set)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from fleetline import apikeys, devicekeys
from fleetline_cli import localenv
from fleetline_cli.main import app
from tests.integration.test_cli_cloud import failed, ok
from tests.support import DEVICE_KEY_SECRET, ApiProcess

pytestmark = pytest.mark.integration

# What `fleetline up` writes, and what the tests set: all unset while a command runs,
# unless given, and unset again after it.
NAMES = ("FLEETLINE_DATABASE_URL", "FLEETLINE_API_URL", "FLEETLINE_DEVICE_MQTT_URL",
         "FLEETLINE_DEVICE_CA_FILE", "FLEETLINE_API_KEY", "FLEETLINE_ENV_FILE")


def run(*args: str, **env: str) -> Result:
    """``fleetline ARGS`` with only ``env`` of the variables above set."""
    return CliRunner().invoke(app, list(args), env={**dict.fromkeys(NAMES), **env},
                              catch_exceptions=False)


def write_env(folder: Path, **values: str) -> Path:
    path = folder / ".fleetline" / "env"
    path.parent.mkdir(parents=True)
    lines = ["# written by `fleetline up` while it runs", ""]
    path.write_text("\n".join(lines + [f"{k}={v}" for k, v in values.items()]) + "\n")
    return path


def test_the_env_file_format() -> None:
    text = "# comment\n\nA=1\n  B = two words \nC=x=y\nnot a line\n=nameless\nD=\n#E=5\n"
    assert localenv.parse(text) == {"A": "1", "B": "two words", "C": "x=y", "D": ""}
    environ = {"A": "mine", "FLEETLINE_ENV_FILE": ""}
    assert localenv.load(environ) is None and environ == {"A": "mine", "FLEETLINE_ENV_FILE": ""}


def test_only_the_deployments_names_and_only_from_a_file_no_one_else_may_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_env(tmp_path, FLEETLINE_API_URL="http://127.0.0.1:1",
                     HTTPS_PROXY="http://elsewhere:3128", FLEETLINE_API_KEY="flk_planted")
    environ = {"FLEETLINE_ENV_FILE": str(path)}
    assert localenv.load(environ) == path
    assert environ == {"FLEETLINE_ENV_FILE": str(path), "FLEETLINE_API_URL": "http://127.0.0.1:1"}
    path.chmod(0o666)
    environ = {"FLEETLINE_ENV_FILE": str(path)}
    assert localenv.load(environ) is None and environ == {"FLEETLINE_ENV_FILE": str(path)}
    assert f"warning: {path} not read: others may write it" in capsys.readouterr().err


def test_apikey_create_then_the_api_through_the_env_file_of_a_parent(
    api: ApiProcess, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_env(tmp_path, FLEETLINE_DATABASE_URL=database_url, FLEETLINE_API_URL=api.url,
              FLEETLINE_DEVICE_MQTT_URL="mqtts://devices.example:8884",
              FLEETLINE_DEVICE_CA_FILE=str(tmp_path / "ca.crt"))
    (tmp_path / "project" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "project" / "sub")
    made = ok(run("apikey", "create", "--scope", "admin", "--name", "from-env"))
    key = made.stdout.strip()
    assert key.startswith("flk_") and "created key" in made.stderr
    keys = yaml.safe_load(ok(run("apikey", "list", "-o", "yaml")).stdout)
    assert any(k["name"] == "from-env" and k["scopes"] == ["admin"] for k in keys)
    reader = json.loads(ok(run("apikey", "create", "-s", "devices:read", "--name", "reader",
                               "-o", "json")).stdout)
    assert reader["scopes"] == ["devices:read"] and reader["token"].startswith("flk_")
    assert apikeys.split_token(reader["token"])[0] == reader["id"]  # type: ignore[index]
    # With --api and an admin key, the same verbs go over the API (no database here).
    over_api = {"FLEETLINE_API_KEY": key, "FLEETLINE_DATABASE_URL": "postgresql://x@127.0.0.1:9/x"}
    grafana = json.loads(ok(run("apikey", "create", "--api", "-s", "telemetry:read", "--name",
                                "grafana", "-o", "json", **over_api)).stdout)
    assert grafana["scopes"] == ["telemetry:read"] and grafana["token"].startswith("flk_")
    listed = json.loads(ok(run("apikey", "list", "--api", "-o", "json", **over_api)).stdout)
    assert {"from-env", "reader", "grafana"} <= {k["name"] for k in listed}
    assert {k["state"] for k in listed} <= {"active", "revoked"}  # other tests' keys too
    # Both ways list a key alike.
    [by_db] = [k for k in yaml.safe_load(ok(run("apikey", "list", "-o", "yaml")).stdout)
               if k["id"] == grafana["id"]]
    [by_api] = [k for k in listed if k["id"] == grafana["id"]]
    assert by_db.keys() >= by_api.keys() and by_db["state"] == by_api["state"] == "active"
    assert ok(run("apikey", "revoke", "--api", grafana["id"], **over_api)).stdout.strip() == (
        f"revoked {grafana['id']}")
    failed(run("apikey", "revoke", "--api", str(apikeys.split_token(key)[0]), **over_api),
           "409", "a key cannot revoke itself")
    failed(run("apikey", "create", "--api", "-s", "admin", FLEETLINE_API_KEY=reader["token"]),
           "403")
    # Without --api, a key in the environment changes nothing: the database makes the key.
    ok(run("apikey", "create", "-s", "devices:read", FLEETLINE_API_KEY="flk_stale"))
    # --json is -o json.
    devices = json.loads(ok(run("device", "list", "--json", FLEETLINE_API_KEY=key)).stdout)
    assert isinstance(devices, list)
    assert json.loads(ok(run("device", "list", "-o", "json", FLEETLINE_API_KEY=key)).stdout) == (
        devices)
    # The device endpoint of the file, without asking the API (which is not reachable).
    device_key = devicekeys.derive_key(DEVICE_KEY_SECRET.encode(), "d1", 1)
    conn = ok(run("device", "connection-string", "d1", "--key", device_key,
                  FLEETLINE_API_URL="http://127.0.0.1:9"))
    assert conn.stdout.strip() == (
        f"HostName=devices.example;Port=8884;DeviceId=d1;SharedAccessKey={device_key}")
    # The environment wins over the file.
    failed(run("device", "list", FLEETLINE_API_KEY=key, FLEETLINE_API_URL="http://127.0.0.1:9"),
           "cannot reach the API at http://127.0.0.1:9", "FLEETLINE_API_URL")
    # FLEETLINE_ENV_FILE names another file; set to nothing, none is read.
    other = tmp_path / "elsewhere.env"
    other.write_text(f"FLEETLINE_API_URL={api.url}\n")
    monkeypatch.chdir(tmp_path.parent)
    ok(run("device", "list", FLEETLINE_API_KEY=key, FLEETLINE_ENV_FILE=str(other)))
    failed(run("device", "list", FLEETLINE_API_KEY=key, FLEETLINE_ENV_FILE=str(tmp_path / "no")),
           f"FLEETLINE_ENV_FILE names {tmp_path / 'no'}, which cannot be read")
    monkeypatch.chdir(tmp_path / "project")
    failed(run("apikey", "list", FLEETLINE_ENV_FILE=""), "cannot reach the database at",
           "FLEETLINE_DATABASE_URL says where it is")
    # A file left behind by an `up` that did not stop cleanly: the error names it.
    other.write_text("FLEETLINE_API_URL=http://127.0.0.1:9\n")
    failed(run("device", "list", FLEETLINE_API_KEY=key, FLEETLINE_ENV_FILE=str(other)),
           "cannot reach the API at http://127.0.0.1:9", f"FLEETLINE_API_URL came from {other}",
           "is it still running?")


def test_errors_say_what_to_do(api: ApiProcess, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    failed(run("device", "list", FLEETLINE_API_URL=api.url),
           "no API key: set FLEETLINE_API_KEY", "fleetline apikey create --scope admin")
    failed(run("twin", "show", "x", FLEETLINE_API_URL=api.url, FLEETLINE_API_KEY="flk_x"),
           "401 Unauthorized", "check FLEETLINE_API_KEY")
    failed(run("alarm", "list", FLEETLINE_API_URL="http://127.0.0.1:9", FLEETLINE_API_KEY="flk_x"),
           "cannot reach the API at http://127.0.0.1:9 (", "is it running?",
           "FLEETLINE_API_URL says where it is")
    failed(run("apikey", "list",
               FLEETLINE_DATABASE_URL="postgresql://postgres:hidden@127.0.0.1:9/fleetline"),
           "cannot reach the database at postgresql://postgres:***@127.0.0.1:9/fleetline")


async def test_output_forms_of_the_existing_verbs(
    api: ApiProcess, make_key: Callable[..., Any], uid: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"FLEETLINE_API_URL": api.url, "FLEETLINE_API_KEY": await make_key("admin")}
    made = yaml.safe_load(ok(run("device", "create", f"{uid}-y", "--tag", f"site={uid}",
                                 "-o", "yaml", **env)).stdout)
    assert made["id"] == f"{uid}-y" and made["credentials"]["key"]
    listed = yaml.safe_load(ok(run("device", "list", "--tag", f"site={uid}", "-o", "yaml",
                                   **env)).stdout)
    assert [d["id"] for d in listed] == [f"{uid}-y"] and listed[0]["tags"] == {"site": uid}
    shown = json.loads(ok(run("device", "show", f"{uid}-y", "--output", "JSON", **env)).stdout)
    assert shown["latest"] == {} and shown["id"] == f"{uid}-y"
    token = yaml.safe_load(ok(run("device", "token", f"{uid}-y", "-o", "yaml", **env)).stdout)
    assert devicekeys.verify_password(made["credentials"]["key"], f"{uid}-y", token["token"])
    table = ok(run("device", "list", "--tag", f"site={uid}", **env)).stdout.splitlines()
    assert table[1].split()[0] == f"{uid}-y"
    bad = run("device", "list", "-o", "xml", **env)
    assert bad.exit_code == 2 and "xml" in bad.stderr
