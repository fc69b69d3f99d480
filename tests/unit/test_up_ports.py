"""How ``fleetline up`` picks the services' ports: a default that is taken gives way to a
free port; a port the environment asks for must be free, else one line says what to do."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from fleetline_dev.embedded import port_is_free
from fleetline_dev.up import PortError, plan_service_ports


@pytest.fixture
def taken() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_taken_default_gives_way_to_a_free_port(taken: int) -> None:
    ports = plan_service_ports({}, {"FLEETLINE_X_PORT": taken, "FLEETLINE_Y_PORT": taken})
    assert taken not in ports.values()
    assert ports["FLEETLINE_X_PORT"] != ports["FLEETLINE_Y_PORT"]
    assert all(port_is_free(p) for p in ports.values())


def test_a_port_asked_for_is_kept_or_refused(taken: int) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        wanted = int(sock.getsockname()[1])
    assert plan_service_ports({"FLEETLINE_X_PORT": str(wanted)}, {"FLEETLINE_X_PORT": 1}) == {
        "FLEETLINE_X_PORT": wanted}
    with pytest.raises(PortError, match=rf"port {taken} \(FLEETLINE_X_PORT\) is in use"):
        plan_service_ports({"FLEETLINE_X_PORT": str(taken)}, {"FLEETLINE_X_PORT": 1})
    for bad in ("eighty", "0", "70000"):
        with pytest.raises(PortError, match="is not a port number"):
            plan_service_ports({"FLEETLINE_X_PORT": bad}, {"FLEETLINE_X_PORT": 1})
