"""``fleetline enrollment`` and ``fleetline ca``: self-provisioning and X.509 CAs, over
the REST API (FLEETLINE_API_URL, FLEETLINE_API_KEY)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fleetline_cli.common import (
    JsonOption,
    Output,
    OutputOption,
    api,
    json_argument,
    print_table,
    printed,
)

enrollment_app = typer.Typer(
    help="Enrollments: who may register itself (docs/provisioning.md).", no_args_is_help=True
)
ca_app = typer.Typer(
    help="X.509 CAs whose device certificates the broker trusts.", no_args_is_help=True
)


def _show_enrollment(e: dict[str, Any]) -> None:
    state = "enabled" if e["enabled"] else "disabled"
    proof = e["ca_name"] and f"CA {e['ca_name']}" or e["thumbprint"] or "symmetric key"
    typer.echo(
        f"{e['id']}: {e['kind']}, {proof}, {state}, pattern {e['registration_pattern']}, "
        f"reprovision {e['reprovision']}, {e['registrations']} device(s)"
    )
    if e.get("key"):
        typer.echo(f"enrollment key (shown once): {e['key']}")


@enrollment_app.command("create")
def enrollment_create(
    enrollment_id: str,
    individual: Annotated[
        bool, typer.Option(help="One device, whose registration id is ENROLLMENT_ID.")
    ] = False,
    ca: Annotated[str | None, typer.Option(help="An X.509 group: its verified CA.")] = None,
    thumbprint: Annotated[
        str | None, typer.Option(help="An X.509 individual enrollment: the certificate's.")
    ] = None,
    pattern: Annotated[
        str, typer.Option(help="Regular expression the whole registration id matches.")
    ] = ".*",
    tag: Annotated[list[str], typer.Option("--tag", "-t", help="Initial tag name=value.")] = [],  # noqa: B006
    desired: Annotated[
        str | None, typer.Option(help="Initial desired twin, a JSON object.")
    ] = None,
    reset: Annotated[
        bool, typer.Option(help="A device that registers again gets the initial tags and twin.")
    ] = False,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """Create an enrollment. A symmetric-key one prints its key (shown this once)."""
    tags = dict(t.partition("=")[::2] for t in tag)
    body: dict[str, Any] = {
        "id": enrollment_id,
        "kind": "individual" if individual else "group",
        "attestation": "x509" if ca or thumbprint else "symmetric_key",
        "registration_pattern": pattern,
        "initial_tags": tags,
        "reprovision": "reset" if reset else "keep",
    }
    if ca:
        body["ca"] = ca
    if thumbprint:
        body["thumbprint"] = thumbprint
    if desired is not None:
        body["initial_desired"] = json_argument(desired, "--desired")
    created = api("POST", "/v1/enrollments", json=body)
    if not printed(created, output, as_json):
        _show_enrollment(created)


@enrollment_app.command("list")
def enrollment_list(output: OutputOption = Output.table, as_json: JsonOption = False) -> None:
    items = api("GET", "/v1/enrollments")["items"]
    if printed(items, output, as_json):
        return
    print_table(
        ["id", "kind", "attestation", "enabled", "pattern", "devices"],
        [
            [
                e["id"],
                e["kind"],
                e["attestation"],
                e["enabled"],
                e["registration_pattern"],
                e["registrations"],
            ]
            for e in items
        ],
    )


@enrollment_app.command("show")
def enrollment_show(
    enrollment_id: str, output: OutputOption = Output.table, as_json: JsonOption = False
) -> None:
    e = api("GET", f"/v1/enrollments/{enrollment_id}")
    if not printed(e, output, as_json):
        _show_enrollment(e)


@enrollment_app.command("registrations")
def enrollment_registrations(
    enrollment_id: str,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    output: OutputOption = Output.table,
    as_json: JsonOption = False,
) -> None:
    """The devices that registered through the enrollment, with each one's last outcome."""
    page = api("GET", f"/v1/enrollments/{enrollment_id}/registrations", params={"limit": limit})
    if printed(page["items"], output, as_json):
        return
    print_table(
        ["registration id", "device", "status", "attempts", "last", "error"],
        [
            [
                r["registration_id"],
                r["device_id"],
                r["status"],
                r["attempts"],
                r["updated_at"],
                r["error"],
            ]
            for r in page["items"]
        ],
    )


def _set_enabled(enrollment_id: str, enabled: bool, output: Output) -> None:
    e = api("PATCH", f"/v1/enrollments/{enrollment_id}", json={"enabled": enabled})
    if not printed(e, output):
        _show_enrollment(e)


@enrollment_app.command("disable")
def enrollment_disable(enrollment_id: str, output: OutputOption = Output.table) -> None:
    """Refuse new registrations (its devices keep working)."""
    _set_enabled(enrollment_id, False, output)


@enrollment_app.command("enable")
def enrollment_enable(enrollment_id: str, output: OutputOption = Output.table) -> None:
    _set_enabled(enrollment_id, True, output)


@enrollment_app.command("renew-key")
def enrollment_renew_key(enrollment_id: str, output: OutputOption = Output.table) -> None:
    """A new enrollment key (shown once); the old one stops working for new registrations."""
    e = api("POST", f"/v1/enrollments/{enrollment_id}/key")
    if not printed(e, output):
        _show_enrollment(e)


@enrollment_app.command("delete")
def enrollment_delete(enrollment_id: str) -> None:
    """Delete the enrollment and its registrations; its devices stay."""
    api("DELETE", f"/v1/enrollments/{enrollment_id}")
    typer.echo(f"deleted {enrollment_id}")


def _show_ca(ca: dict[str, Any]) -> None:
    state = "verified" if ca["verified"] else f"unverified, code {ca['verification_code']}"
    typer.echo(f"{ca['name']}: {ca['subject']}, {state}, until {ca['not_after']}")


def _pem(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise typer.BadParameter(str(exc)) from None


@ca_app.command("add")
def ca_add(
    name: str, certificate: Path, output: OutputOption = Output.table, as_json: JsonOption = False
) -> None:
    """Register a CA certificate (PEM). Then sign a certificate whose common name is the
    verification code printed here with the CA's key, and give it to `fleetline ca verify`."""
    ca = api("POST", "/v1/cas", json={"name": name, "certificate": _pem(certificate)})
    if not printed(ca, output, as_json):
        _show_ca(ca)


@ca_app.command("verify")
def ca_verify(name: str, proof: Path, output: OutputOption = Output.table) -> None:
    """Prove possession of the CA's key: the certificate it signed for the verification
    code (PEM). Devices' certificates it signs are trusted from then on."""
    ca = api("POST", f"/v1/cas/{name}/verify", json={"certificate": _pem(proof)})
    if not printed(ca, output):
        _show_ca(ca)


@ca_app.command("list")
def ca_list(output: OutputOption = Output.table, as_json: JsonOption = False) -> None:
    items = api("GET", "/v1/cas")["items"]
    if printed(items, output, as_json):
        return
    print_table(
        ["name", "subject", "verified", "not after", "thumbprint"],
        [[c["name"], c["subject"], c["verified"], c["not_after"], c["thumbprint"]] for c in items],
    )


@ca_app.command("delete")
def ca_delete(name: str) -> None:
    """Stop trusting the CA: its devices are disconnected within seconds."""
    api("DELETE", f"/v1/cas/{name}")
    typer.echo(f"deleted {name}")
