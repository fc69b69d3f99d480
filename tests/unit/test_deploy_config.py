"""The broker configuration is shipped twice: for the broker image and for Kubernetes."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_kubernetes_broker_config_is_the_projects() -> None:
    shipped = (ROOT / "deploy/mosquitto/fleetline.conf").read_text()
    copy = (ROOT / "deploy/k8s/base/mosquitto/fleetline.conf").read_text()
    assert copy == shipped, "cp deploy/mosquitto/fleetline.conf deploy/k8s/base/mosquitto/"
