"""The Kubernetes manifests as `kubectl apply -k` reads them: deploy/k8s/check.sh renders
both overlays (and prod with the cert-manager component) with kubectl's kustomize, checks
the broker-config copy and that the Grafana dashboards are what their code renders; here
also what devices are offered: TLS on a LoadBalancer, plain MQTT only inside the cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is not installed (it renders deploy/k8s); install kubectl",
                    pytrace=False)
    return found


def test_check_script_passes() -> None:
    kubectl()
    validate = Path(sys.executable).parent / "kubernetes-validate"
    done = subprocess.run(["bash", str(ROOT / "deploy/k8s/check.sh")], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "KUBERNETES_VALIDATE": str(validate)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: overlays/prod with components/cert-manager renders" in done.stdout
    # Strictly validated, not skipped: unknown fields and wrong types fail the check.
    assert "ok: overlays/prod validates (kubernetes-validate --strict" in done.stdout


def test_devices_get_tls_on_a_load_balancer_and_plain_mqtt_stays_inside() -> None:
    import yaml

    rendered = subprocess.run([kubectl(), "kustomize", str(ROOT / "deploy/k8s/overlays/prod")],
                              capture_output=True, text=True, timeout=120, check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    services = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"}
    devices = services["prod-fleetline-mosquitto-devices"]
    assert devices["type"] == "LoadBalancer"
    assert [p["port"] for p in devices["ports"]] == [8883]
    inside = services["prod-fleetline-mosquitto"]
    assert inside["type"] == "ClusterIP" and [p["port"] for p in inside["ports"]] == [1883]
    for name, spec in services.items():
        if spec.get("type") in ("LoadBalancer", "NodePort"):
            assert all(p["port"] != 1883 for p in spec["ports"]), name
    # The api's Service carries its HTTP port only: /metrics (9102) stays in the pod.
    assert [p["port"] for p in services["prod-fleetline-api"]["ports"]] == [8000]
    [broker] = [d for d in docs if d["kind"] == "StatefulSet"
                and d["metadata"]["name"] == "prod-fleetline-mosquitto"]
    volumes = {v["name"]: v for v in broker["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "fleetline-mosquitto-tls"
    conf = (ROOT / "deploy/k8s/base/mosquitto/mosquitto.conf").read_text()
    assert "listener 8883" in conf and "certfile /mosquitto/tls/tls.crt" in conf


def test_strict_validation_refuses_an_unknown_field() -> None:
    """What check.sh's validation step means: a typo in a manifest fails it."""
    validate = Path(sys.executable).parent / "kubernetes-validate"
    rendered = subprocess.run([kubectl(), "kustomize", str(ROOT / "deploy/k8s/overlays/prod")],
                              capture_output=True, text=True, timeout=120, check=True).stdout
    broken = rendered.replace("  replicas:", "  replicaz:", 1)
    assert broken != rendered
    for manifests, code in ((rendered, 0), (broken, 1)):
        done = subprocess.run([str(validate), "--strict", "-k", "1.30.0", "--quiet", "-"],
                              input=manifests, capture_output=True, text=True, timeout=120)
        assert (done.returncode != 0) == bool(code), done.stdout + done.stderr
