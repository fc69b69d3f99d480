"""The Kubernetes manifests as `kubectl apply -k` reads them: deploy/k8s/check.sh renders
both overlays (and prod with each optional component) with kubectl's kustomize, checks
the broker-config copy and that the Grafana dashboards are what their code renders. Here,
from the rendered manifests, what they promise: devices get TLS on a LoadBalancer and
plain MQTT stays inside; each overlay has its namespace under Pod Security's restricted
profile, which every pod meets; every service pod migrates in an init container first;
images name their registry; the network policies let through exactly the documented
connections; disruption budgets cover only workloads that can lose a replica, apart from
the broker's deliberate one. Also make-secrets.sh against a stand-in kubectl, and the
database's init script with the migrations on a real TimescaleDB."""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
NAMESPACES = {"dev": "fleetline-dev", "prod": "fleetline"}
SERVICES = ("ingest", "api", "rules")
WORKLOADS = ("Deployment", "StatefulSet")
CLUSTER_SCOPED = {"Namespace"}


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is not installed (it renders deploy/k8s); install kubectl",
                    pytrace=False)
    return found


@functools.cache
def render(overlay: str, *components: str, images: str = "") -> tuple[dict[str, Any], ...]:
    """The overlay as `kubectl kustomize` renders it, with `components` added to its
    `components:` list as an operator would (in a copy beside the overlays, so that its
    relative paths hold) and `images` (YAML) appended to its kustomization."""
    import yaml

    source = K8S / "overlays" / overlay
    if not components and not images:
        target = source
        scratch = None
    else:
        scratch = Path(tempfile.mkdtemp(prefix=".test-", dir=K8S / "overlays"))
        for f in source.glob("*.yaml"):
            shutil.copy(f, scratch / f.name)
        text = (source / "kustomization.yaml").read_text()
        added = "".join(f"  - ../../components/{c}\n" for c in components)
        assert "\ncomponents:\n" in text
        text = text.replace("\ncomponents:\n", "\ncomponents:\n" + added, 1) + images
        (scratch / "kustomization.yaml").write_text(text)
        target = scratch
    try:
        out = subprocess.run([kubectl(), "kustomize", str(target)], capture_output=True,
                             text=True, timeout=120, check=True).stdout
    finally:
        if scratch is not None:
            shutil.rmtree(scratch)
    return tuple(d for d in yaml.safe_load_all(out) if d)


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in WORKLOADS}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_check_script_passes() -> None:
    kubectl()
    validate = Path(sys.executable).parent / "kubernetes-validate"
    done = subprocess.run(["bash", str(K8S / "check.sh")], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "KUBERNETES_VALIDATE": str(validate)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: overlays/prod with components/cert-manager renders" in done.stdout
    assert "ok: overlays/prod with components/prometheus-operator renders" in done.stdout
    # Strictly validated, not skipped: unknown fields and wrong types fail the check.
    assert "ok: overlays/prod validates (kubernetes-validate --strict" in done.stdout
    for component in ("ingress", "autoscaling"):
        assert f"ok: overlays/prod with components/{component} renders and validates" \
            in done.stdout
    assert "ok: make-secrets.sh parses" in done.stdout


def test_devices_get_tls_on_a_load_balancer_and_plain_mqtt_stays_inside() -> None:
    docs = render("prod")
    services = {name: d["spec"] for name, d in of_kind(docs, "Service").items()}
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
    broker = workloads(docs)["prod-fleetline-mosquitto"]
    volumes = {v["name"]: v for v in pod_spec(broker)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "fleetline-mosquitto-tls"
    conf = (K8S / "base/mosquitto/mosquitto.conf").read_text()
    assert "listener 8883" in conf and "certfile /mosquitto/tls/tls.crt" in conf


def test_strict_validation_refuses_an_unknown_field() -> None:
    """What check.sh's validation step means: a typo in a manifest fails it."""
    validate = Path(sys.executable).parent / "kubernetes-validate"
    rendered = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays/prod")],
                              capture_output=True, text=True, timeout=120, check=True).stdout
    broken = rendered.replace("  replicas:", "  replicaz:", 1)
    assert broken != rendered
    for manifests, code in ((rendered, 0), (broken, 1)):
        done = subprocess.run([str(validate), "--strict", "-k", "1.30.0", "--quiet", "-"],
                              input=manifests, capture_output=True, text=True, timeout=120)
        assert (done.returncode != 0) == bool(code), done.stdout + done.stderr


# --- Namespace and Pod Security --------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(NAMESPACES))
def test_each_overlay_deploys_into_its_namespace_under_the_restricted_profile(
    overlay: str,
) -> None:
    docs = render(overlay)
    ns = NAMESPACES[overlay]
    [namespace] = of_kind(docs, "Namespace").values()
    assert namespace["metadata"]["name"] == ns
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for d in docs:
        if d["kind"] not in CLUSTER_SCOPED:
            assert d["metadata"].get("namespace") == ns, (d["kind"], d["metadata"]["name"])


def restricted_violations(workload: dict[str, Any]) -> list[str]:
    """What Pod Security Admission's restricted profile (v1.30) refuses in a pod
    template: the baseline checks that apply to these manifests, and restricted's own."""
    spec = pod_spec(workload)
    pod = spec.get("securityContext", {})
    found = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(key)
    allowed = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
               "persistentVolumeClaim", "projected", "secret"}
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= allowed:
            found.append(f"volume {volume['name']}: {sorted(kinds - allowed)}")
    if pod.get("runAsUser") == 0:
        found.append("pod runAsUser 0")
    for c in containers(workload):
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation not false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            found.append(f"{name}: capabilities not dropped")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities added")
        if sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            found.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser", pod.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{name}: hostPort")
    return found


@pytest.mark.parametrize("overlay", sorted(NAMESPACES))
def test_every_pod_meets_the_restricted_profile(overlay: str) -> None:
    found = workloads(render(overlay))
    assert len(found) == 6  # ingest, api, rules, broker, Grafana, the database
    for name, workload in found.items():
        assert restricted_violations(workload) == [], name
        # And the project's own hardening on top.
        for c in containers(workload):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert c["resources"]["limits"] and c["resources"]["requests"], (name, c["name"])


def test_the_restricted_check_refuses_what_the_profile_refuses() -> None:
    [api] = [w for n, w in workloads(render("prod")).items() if n.endswith("-api")]
    assert restricted_violations(api) == []
    broken = json.loads(json.dumps(api))
    del pod_spec(broken)["initContainers"][0]["securityContext"]["allowPrivilegeEscalation"]
    pod_spec(broken)["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert restricted_violations(broken) == [
        "volume host: ['hostPath']", "migrate: allowPrivilegeEscalation not false"]


# --- Migrations, images, spreading -------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(NAMESPACES))
def test_every_service_pod_migrates_in_an_init_container_first(overlay: str) -> None:
    docs = render(overlay)
    prefix = f"{overlay}-"
    found = workloads(docs)
    for svc in SERVICES:
        spec = pod_spec(found[f"{prefix}fleetline-{svc}"])
        [main] = spec["containers"]
        [init] = spec["initContainers"]
        assert init["name"] == "migrate" and init["args"] == ["migrate"]
        assert init["image"] == main["image"]
        # The same settings and database URL as the service itself.
        assert init["envFrom"] == main["envFrom"]
        refs = [next(iter(e.values()))["name"] for e in init["envFrom"]]
        assert refs[0].startswith(f"{prefix}fleetline-config-") and refs[1] == "fleetline"
        assert init["securityContext"] == main["securityContext"]
        [tmp] = init["volumeMounts"]
        assert tmp["mountPath"] == "/tmp"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[tmp["name"]]
    # No migration Job any more, nor anything that served only it.
    assert not [d for d in docs if d["kind"] == "Job" or "migrate" in d["metadata"]["name"]]
    assert "fleetline.io/phase" not in json.dumps(docs)
    assert not (K8S / "base" / "migrate.yaml").exists()


@pytest.mark.parametrize("overlay", sorted(NAMESPACES))
def test_every_image_names_its_registry(overlay: str) -> None:
    images = {c["image"] for w in workloads(render(overlay)).values() for c in containers(w)}
    for image in images:
        registry = image.split("/")[0]
        assert "/" in image and ("." in registry or ":" in registry), image
    assert {"ghcr.io/fleetline/fleetline:0.1.0",
            "ghcr.io/fleetline/fleetline-mosquitto:0.1.0"} <= images


def test_an_overlay_points_the_images_at_another_registry() -> None:
    """The override README.md documents: the published names, in the overlay."""
    own = ("images:\n"
           "  - name: ghcr.io/fleetline/fleetline\n"
           "    newName: registry.example.org/fleetline\n"
           "    newTag: \"0.2.0\"\n"
           "  - name: ghcr.io/fleetline/fleetline-mosquitto\n"
           "    newName: registry.example.org/fleetline-mosquitto\n"
           "    newTag: \"0.2.0\"\n")
    images = {c["image"] for w in workloads(render("prod", images=own)).values()
              for c in containers(w)}
    assert not [i for i in images if i.startswith("ghcr.io/")]
    assert {"registry.example.org/fleetline:0.2.0",
            "registry.example.org/fleetline-mosquitto:0.2.0"} <= images


def test_service_replicas_spread_over_nodes() -> None:
    found = workloads(render("prod"))
    for svc in SERVICES:
        spec = pod_spec(found[f"prod-fleetline-{svc}"])
        [spread] = spec["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname"
        assert spread["maxSkew"] == 1 and spread["whenUnsatisfiable"] == "ScheduleAnyway"
        labels = found[f"prod-fleetline-{svc}"]["spec"]["template"]["metadata"]["labels"]
        assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/name"] == \
            f"fleetline-{svc}"
        assert selects(spread["labelSelector"], labels)


# --- Network policies --------------------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": present and value in e.get("values", []),
              "NotIn": not present or value not in e.get("values", []),
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


class Peer:
    """Where a connection comes from: a pod (its labels, its namespace) or outside the
    cluster (an address)."""

    def __init__(self, labels: dict[str, str] | None = None, namespace: str = "",
                 address: str = "203.0.113.7") -> None:
        self.labels = labels
        self.namespace = namespace
        self.address = address


def admitted(docs: tuple[dict[str, Any], ...], src: Peer, dst: dict[str, Any],
             port: int) -> bool:
    """Whether the namespace's NetworkPolicies let `src` open `port` (TCP) on a pod of
    the workload `dst`, as the NetworkPolicy API defines it."""
    ns = dst["metadata"]["namespace"]
    labels = dst["spec"]["template"]["metadata"]["labels"]
    named = {p["name"]: p["containerPort"] for c in containers(dst)
             for p in c.get("ports", []) if "name" in p}
    policies = [p for p in docs if p["kind"] == "NetworkPolicy"
                and p["metadata"]["namespace"] == ns
                and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                and selects(p["spec"]["podSelector"], labels)]
    if not policies:
        return True

    def port_ok(rule: dict[str, Any]) -> bool:
        if "ports" not in rule:
            return True
        return any(p.get("protocol", "TCP") == "TCP"
                   and named.get(p["port"], p["port"]) == port for p in rule["ports"])

    def peer_ok(peer: dict[str, Any]) -> bool:
        if "ipBlock" in peer:
            block = peer["ipBlock"]
            return (src.labels is None
                    and ipaddress.ip_address(src.address) in ipaddress.ip_network(block["cidr"])
                    and not any(ipaddress.ip_address(src.address) in ipaddress.ip_network(x)
                                for x in block.get("except", [])))
        if src.labels is None:
            return False
        if "namespaceSelector" in peer:
            # Namespaces carry kubernetes.io/metadata.name; nothing else is assumed.
            if not selects(peer["namespaceSelector"],
                           {"kubernetes.io/metadata.name": src.namespace}):
                return False
        elif src.namespace != ns:
            return False
        return selects(peer.get("podSelector", {}), src.labels)

    return any(port_ok(rule) and ("from" not in rule or any(peer_ok(p) for p in rule["from"]))
               for policy in policies for rule in policy["spec"].get("ingress", []))


@pytest.mark.parametrize("overlay", sorted(NAMESPACES))
def test_network_policies_admit_exactly_the_documented_connections(overlay: str) -> None:
    docs = render(overlay)
    ns = NAMESPACES[overlay]
    pods = {n.removeprefix(f"{overlay}-fleetline-"): w for n, w in workloads(docs).items()}
    assert set(pods) == {"ingest", "api", "rules", "mosquitto", "grafana", "timescaledb"}

    def inside(name: str) -> Peer:
        return Peer(pods[name]["spec"]["template"]["metadata"]["labels"], ns)

    outside = Peer()
    prometheus = Peer({"app.kubernetes.io/name": "prometheus"}, "monitoring")
    stranger = Peer({"app.kubernetes.io/name": "fleetline-api"}, "elsewhere")

    def ok(src: Peer, dst: str, port: int) -> bool:
        return admitted(docs, src, pods[dst], port)

    # Devices: TLS from anywhere; plain MQTT from the services only.
    assert ok(outside, "mosquitto", 8883)
    assert not ok(outside, "mosquitto", 1883)
    for svc in SERVICES:
        assert ok(inside(svc), "mosquitto", 1883), svc
    assert not ok(inside("grafana"), "mosquitto", 1883)
    assert not ok(stranger, "mosquitto", 1883)
    # The database: fleetline's pods that use it, nobody else.
    for user in (*SERVICES, "grafana", "mosquitto"):
        assert ok(inside(user), "timescaledb", 5432), user
    assert not ok(outside, "timescaledb", 5432)
    assert not ok(prometheus, "timescaledb", 5432)
    assert not ok(stranger, "timescaledb", 5432)
    # HTTP from anywhere (an ingress controller, wherever it runs).
    assert ok(outside, "api", 8000) and ok(outside, "grafana", 3000)
    # Metrics from any namespace of the cluster, never from outside.
    for svc, port in (("ingest", 9101), ("api", 9102), ("rules", 9103)):
        assert ok(prometheus, svc, port), svc
        assert not ok(outside, svc, port), svc
    assert not ok(prometheus, "mosquitto", 1883)
    assert not ok(outside, "rules", 8000)
    # Every pod is isolated (the default deny selects them all), and no egress is.
    [deny] = [p for p in docs if p["kind"] == "NetworkPolicy"
              and p["metadata"]["name"].endswith("fleetline-default-deny")]
    assert deny["spec"]["podSelector"] == {} and "ingress" not in deny["spec"]
    for p in docs:
        if p["kind"] == "NetworkPolicy":
            assert "Egress" not in p["spec"]["policyTypes"], p["metadata"]["name"]


def test_the_policy_model_tells_allowed_from_refused() -> None:
    """`admitted` itself: the same pod is refused once its policy is taken away."""
    docs = render("prod")
    broker = workloads(docs)["prod-fleetline-mosquitto"]
    assert admitted(docs, Peer(), broker, 8883)
    without = tuple(d for d in docs if d["metadata"]["name"] != "prod-fleetline-mosquitto"
                    or d["kind"] != "NetworkPolicy")
    assert not admitted(without, Peer(), broker, 8883)
    no_policies = tuple(d for d in docs if d["kind"] != "NetworkPolicy")
    assert admitted(no_policies, Peer(), broker, 1883)


# --- Disruption budgets ------------------------------------------------------------------


@pytest.mark.parametrize(("overlay", "components"),
                         [("dev", ()), ("prod", ()), ("dev", ("autoscaling",)),
                          ("prod", ("autoscaling",))])
def test_no_budget_covers_a_single_replica_but_the_brokers(
    overlay: str, components: tuple[str, ...],
) -> None:
    docs = render(overlay, *components)
    found = workloads(docs)
    minimum = {h["spec"]["scaleTargetRef"]["name"]: h["spec"]["minReplicas"]
               for h in of_kind(docs, "HorizontalPodAutoscaler").values()}
    budgets = of_kind(docs, "PodDisruptionBudget")
    broker = f"{overlay}-fleetline-mosquitto"
    assert budgets[broker]["spec"] == {
        "maxUnavailable": 0,
        "selector": found[broker]["spec"]["selector"]}
    for name, budget in budgets.items():
        selector = budget["spec"]["selector"]
        covered = [w for w, d in found.items()
                   if selects(selector, d["spec"]["template"]["metadata"]["labels"])]
        assert len(covered) == 1, name
        [workload] = covered
        replicas = max(found[workload]["spec"].get("replicas", 1), minimum.get(workload, 0))
        if workload != broker:
            assert replicas > 1, (name, replicas)
    assert f"{overlay}-fleetline-rules" not in budgets
    if overlay == "prod":  # two api replicas, each eviction one at a time
        assert budgets["prod-fleetline-api"]["spec"]["maxUnavailable"] == 1


# --- The optional components, as an overlay includes them ----------------------------------


def test_the_ingress_component_routes_to_the_api_and_grafana() -> None:
    docs = render("prod", "ingress")
    [ingress] = of_kind(docs, "Ingress").values()
    assert ingress["spec"]["ingressClassName"] == "nginx"
    services = of_kind(docs, "Service")
    routes = {}
    for rule in ingress["spec"]["rules"]:
        [path] = rule["http"]["paths"]
        backend = path["backend"]["service"]
        service = services[backend["name"]]
        [port] = [p for p in service["spec"]["ports"] if p["name"] == backend["port"]["name"]]
        routes[rule["host"]] = (backend["name"], port["port"])
    assert routes == {"api.example.org": ("prod-fleetline-api", 8000),
                      "grafana.example.org": ("prod-fleetline-grafana", 3000)}
    assert {t["secretName"] for t in ingress["spec"]["tls"]} == {
        "fleetline-api-tls", "fleetline-grafana-tls"}


def test_the_autoscaling_component_scales_api_and_ingest_in_a_share_group() -> None:
    docs = render("prod", "autoscaling")
    found = workloads(docs)
    scalers = {h["spec"]["scaleTargetRef"]["name"]: h["spec"]
               for h in of_kind(docs, "HorizontalPodAutoscaler").values()}
    assert {n: (s["minReplicas"], s["maxReplicas"]) for n, s in scalers.items()} == {
        "prod-fleetline-api": (2, 6), "prod-fleetline-ingest": (2, 8)}
    for name, spec in scalers.items():
        assert found[name]["kind"] == spec["scaleTargetRef"]["kind"]
        [metric] = spec["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"]["averageUtilization"] == 70
    assert scalers["prod-fleetline-ingest"]["behavior"]["scaleDown"]["selectPolicy"] == \
        "Disabled"
    [ingest] = pod_spec(found["prod-fleetline-ingest"])["containers"]
    env = {e["name"]: e.get("value") for e in ingest["env"]}
    assert env["FLEETLINE_INGEST_SHARE_GROUP"] == "ingest"
    # Without the component, ingest runs no share group.
    [alone] = pod_spec(workloads(render("prod"))["prod-fleetline-ingest"])["containers"]
    assert "FLEETLINE_INGEST_SHARE_GROUP" not in {e["name"] for e in alone["env"]}


def test_the_service_monitors_find_a_metrics_port_for_each_service() -> None:
    docs = render("prod", "prometheus-operator")
    services = of_kind(docs, "Service")
    monitors = of_kind(docs, "ServiceMonitor")
    assert set(monitors) == {f"prod-fleetline-{s}" for s in SERVICES}
    for name, monitor in monitors.items():
        [endpoint] = monitor["spec"]["endpoints"]
        ports = [p["port"] for s in services.values()
                 if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
                 for p in s["spec"]["ports"] if p["name"] == endpoint["port"]]
        assert len(ports) == 1, name
    assert [p["port"] for p in services["prod-fleetline-api"]["spec"]["ports"]] == [8000]


def test_the_readme_command_wraps_the_alert_rules_in_a_prometheus_rule() -> None:
    import yaml

    readme = (K8S / "README.md").read_text()
    [command] = [b for b in re.findall(r"```sh\n(.*?)```", readme, re.S)
                 if "kind: PrometheusRule" in b]
    assert 'kubectl -n "$NS" apply -f -' in command
    out = subprocess.run(["bash", "-c", command.replace('kubectl -n "$NS" apply -f -', "cat")],
                         cwd=ROOT, capture_output=True, text=True, timeout=30, check=True).stdout
    rule = yaml.safe_load(out)
    assert rule["kind"] == "PrometheusRule"
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    rules = yaml.safe_load((ROOT / "deploy/prometheus/fleetline-alerts.yml").read_text())
    assert rule["spec"] == rules


# --- The database ------------------------------------------------------------------------


def test_the_database_runs_timescaledb_on_its_own_volume() -> None:
    docs = render("prod")
    db = workloads(docs)["prod-fleetline-timescaledb"]
    spec = pod_spec(db)
    [c] = spec["containers"]
    assert c["image"] == "docker.io/timescale/timescaledb:2.28.3-pg17"
    pod = spec["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (70, 70, 70)
    settings = dict(a.split("=", 1) for a in c["args"][1::2])
    assert c["args"][0::2] == ["-c"] * len(settings)
    assert settings["timescaledb.telemetry_level"] == "off"
    # Every pool at the autoscaling component's maximum: api 6 x (10 + 8 + 2 listeners),
    # ingest 8 x (2 writers + 2), rules 5 + 4 + 2, Grafana 10, the broker and migrations.
    assert int(settings["max_connections"]) >= 6 * 20 + 8 * 4 + 11 + 10 + 2 + 3
    env = {e["name"]: e for e in c["env"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert env["PGDATA"]["value"].startswith(mounts["data"] + "/")
    assert mounts["initdb"] == "/docker-entrypoint-initdb.d"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["initdb"]["configMap"]["name"] in of_kind(docs, "ConfigMap")
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == \
        "fleetline-timescaledb"
    assert env["FLEETLINE_GRAFANA_DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "fleetline-grafana", "key": "FLEETLINE_GRAFANA_DB_PASSWORD"}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["exec"]["command"][0] == "pg_isready", probe
    [claim] = db["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    [port] = of_kind(docs, "Service")["prod-fleetline-timescaledb"]["spec"]["ports"]
    assert port["port"] == 5432
    assert db["spec"]["serviceName"] == "prod-fleetline-timescaledb"


def readme_sql(marker: str) -> str:
    readme = (K8S / "README.md").read_text()
    [sql] = [b for b in re.findall(r"<<'SQL'\n(.*?)\n *SQL\n", readme, re.S) if marker in b]
    return str(sql)


@pytest.fixture
def timescaledb(tmp_path: Path) -> Iterator[Any]:
    """An empty TimescaleDB server of its own (the init script creates server-wide
    roles), with the embedded PostgreSQL's client tools."""
    from fleetline_dev.embedded import EmbeddedError, LocalPostgres, ensure_timescaledb

    try:
        ensure_timescaledb()
    except EmbeddedError as exc:
        pytest.fail(f"TimescaleDB could not be built into the embedded PostgreSQL: {exc}",
                    pytrace=False)
    with LocalPostgres(tmp_path / "pg", timescaledb=True) as server:
        yield server


async def test_the_init_script_prepares_what_the_migrations_and_readers_need(
    timescaledb: Any,
) -> None:
    import asyncpg

    from fleetline.migrate import migrate
    from fleetline.settings import StorageSettings
    from fleetline_dev.embedded import _pg_binaries

    psql_env = {**os.environ, "PATH": f"{_pg_binaries()}:{os.environ['PATH']}",
                "PGHOST": "127.0.0.1", "PGPORT": str(timescaledb.port),
                "POSTGRES_USER": "postgres", "FLEETLINE_DB_PASSWORD": "db-pw",
                "FLEETLINE_GRAFANA_DB_PASSWORD": "grafana-pw",
                "FLEETLINE_BROKER_DB_PASSWORD": "broker-pw"}
    script = K8S / "components/timescaledb/initdb/fleetline.sh"
    done = subprocess.run(["bash", str(script)], env=psql_env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    def url(user: str) -> str:
        return f"postgresql://{user}@127.0.0.1:{timescaledb.port}/fleetline"

    # `fleetline migrate` as the services' role, as the init container runs it.
    assert await migrate(url("fleetline"), StorageSettings(timescale="auto")) > 0
    assert await migrate(url("fleetline"), StorageSettings(timescale="auto")) == 0
    con = await asyncpg.connect(url("fleetline"))
    try:
        assert await con.fetchval("SELECT timescale FROM storage_config") is True
        assert await con.fetchval(
            "SELECT extowner::regrole::text FROM pg_extension WHERE extname = 'timescaledb'"
        ) == "postgres"
        assert await con.fetchval(
            "SELECT datdba::regrole::text FROM pg_database WHERE datname = 'fleetline'"
        ) == "fleetline"
        # A reading, so the views Grafana reads (continuous aggregates owned by
        # fleetline, not a superuser) have a row to show.
        sid = await con.fetchval(
            "INSERT INTO series (device_id, metric) VALUES ('d1', 't') RETURNING id")
        await con.execute("INSERT INTO telemetry (series_id, ts, value)"
                          " VALUES ($1, now() - interval '2 hours', 1.5)", sid)
        await con.execute("INSERT INTO series_latest (series_id, ts, value)"
                          " VALUES ($1, now() - interval '2 hours', 1.5)", sid)
    finally:
        await con.close()
    grafana = await asyncpg.connect(url("fleetline_grafana"))
    try:
        assert await grafana.fetchval("SHOW statement_timeout") == "30s"
        assert await grafana.fetchval("SELECT count(*) FROM device_status") == 0
        for view in ("readings", "readings_1m", "readings_1h", "device_metrics"):
            assert await grafana.fetchval(f"SELECT count(*) FROM {view}") == 1, view
        for view in ("alarms", "dead_letters", "limit_refusals"):
            assert await grafana.fetchval(f"SELECT count(*) FROM {view}") == 0, view
        # No other role may create devices through the function that runs as its owner.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await grafana.fetchval("SELECT fleetline_gateway_child('gw', 'c', true)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await grafana.fetchval("SELECT count(*) FROM devices")
    finally:
        await grafana.close()
    # The broker's grants of README.md's "Deploy", then what its plugin reads.
    done = subprocess.run(["psql", "-U", "postgres", "-d", "fleetline", "-v", "ON_ERROR_STOP=1"],
                          input=readme_sql("GRANT SELECT ON devices"), env=psql_env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    broker = await asyncpg.connect(url("fleetline_broker"))
    try:
        assert await broker.fetchval("SELECT count(*) FROM devices") == 0
        # A gateway's children: asked through the registry's function, refusals added.
        asked = await broker.fetchrow("SELECT * FROM fleetline_gateway_child('gw', 'c', true)")
        assert tuple(asked) == (None, "'c' is not a child of 'gw'")
        await broker.execute(
            "INSERT INTO gateway_refusals AS r (gateway_id, child_id, reason, topic, count) "
            "VALUES ('gw', 'c', 'r', 't', 1) ON CONFLICT (gateway_id, child_id) "
            "DO UPDATE SET count = r.count + 1")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await broker.fetchval("SELECT count(*) FROM api_keys")
    finally:
        await broker.close()


# --- make-secrets.sh ---------------------------------------------------------------------

FAKE_KUBECTL = '''#!{python}
"""kubectl as make-secrets.sh uses it, over a JSON file of Secrets."""
import base64, json, os, sys
store = os.environ["FAKE_KUBE_STORE"]
args = sys.argv[1:]
ns = None
if args[:1] == ["-n"]:
    ns, args = args[1], args[2:]
data = json.load(open(store)) if os.path.exists(store) else {{}}
if args[:2] == ["get", "namespace"]:
    sys.exit(0 if args[2] in os.environ["FAKE_KUBE_NAMESPACES"].split() else 1)
if args[:2] == ["get", "secret"]:
    key = f"{{ns}}/{{args[2]}}"
    if "--ignore-not-found" in args:
        if key in data:
            print(f"secret/{{args[2]}}")
        sys.exit(0)
    if key not in data:
        sys.exit(1)
    path = args[args.index("-o") + 1]
    assert path.startswith("jsonpath={{.data.") and path.endswith("}}"), path
    sys.stdout.write(data[key].get(path[len("jsonpath={{.data."):-1].replace("\\\\.", "."), ""))
    sys.exit(0)
if args[:3] == ["create", "secret", "generic"]:
    key = f"{{ns}}/{{args[3]}}"
    if key in data:
        print("AlreadyExists", file=sys.stderr)
        sys.exit(1)
    values = {{}}
    for a in args[4:]:
        assert a.startswith("--from-file="), a
        k, p = a[len("--from-file="):].split("=", 1)
        values[k] = base64.b64encode(open(p, "rb").read()).decode()
    data[key] = values
    json.dump(data, open(store, "w"))
    sys.exit(0)
sys.exit(f"unexpected: {{sys.argv}}")
'''


class Cluster:
    """make-secrets.sh run against a stand-in kubectl that keeps Secrets in a file."""

    def __init__(self, tmp: Path, namespaces: str) -> None:
        self.tmp = tmp
        self.store = tmp / "secrets.json"
        fake = tmp / "kubectl"
        fake.write_text(FAKE_KUBECTL.format(python=sys.executable))
        fake.chmod(0o755)
        self.env = {**os.environ, "KUBECTL": str(fake), "FAKE_KUBE_STORE": str(self.store),
                    "FAKE_KUBE_NAMESPACES": namespaces, "XDG_CONFIG_HOME": str(tmp / "config")}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(K8S / "make-secrets.sh"), *args], env=self.env,
                              cwd=self.tmp, capture_output=True, text=True, timeout=60)

    def secrets(self, ns: str) -> dict[str, dict[str, str]]:
        data = json.loads(self.store.read_text()) if self.store.exists() else {}
        return {k.split("/", 1)[1]: {kk: base64.b64decode(v).decode() for kk, v in s.items()}
                for k, s in data.items() if k.startswith(f"{ns}/")}

    def drop(self, ns: str, name: str) -> None:
        data = json.loads(self.store.read_text())
        del data[f"{ns}/{name}"]
        self.store.write_text(json.dumps(data))


def expected_secrets() -> set[str]:
    """Every Secret the rendered manifests refer to (the Ingress's TLS Secrets are the
    component's, made by hand or cert-manager; optional ones, as the api's bootstrap
    token, are made by hand for a while)."""
    names: set[str] = set()
    for w in workloads(render("prod")).values():
        for c in containers(w):
            names |= {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
            names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                      if "secretKeyRef" in e.get("valueFrom", {})
                      and not e["valueFrom"]["secretKeyRef"].get("optional")}
        for v in pod_spec(w).get("volumes", []):
            if "secret" in v:
                names.add(v["secret"]["secretName"])
            for s in v.get("projected", {}).get("sources", []):
                if "secret" in s:
                    names.add(s["secret"]["name"])
    return names


def consistent(secrets: dict[str, dict[str, str]], prefix: str) -> None:
    services = dict(line.split(":") for line in
                    secrets["fleetline-mosquitto-auth"]["mqtt-services"].splitlines())
    for svc in SERVICES:
        url = re.fullmatch(r"mqtt://([^:]+):([^@]+)@(.+)", secrets["fleetline-mqtt"][svc])
        assert url is not None
        assert url[1] == f"fleetline-{svc}" and url[3] == f"{prefix}fleetline-mosquitto:1883"
        assert services[url[1]] == hashlib.sha256(url[2].encode()).hexdigest()
    assert len(secrets["fleetline-device-key"]["device-key-secret"]) >= 32


def test_make_secrets_creates_every_secret_once_and_consistently(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, "fleetline")
    first = cluster.run("fleetline", "--mqtt-host", "mqtt.example.org")
    assert first.returncode == 0, first.stderr
    made = cluster.secrets("fleetline")
    assert set(made) == expected_secrets()
    assert {line.split()[1] for line in first.stdout.splitlines()
            if line.startswith("created:")} == set(made)
    consistent(made, "prod-")
    db = made["fleetline-timescaledb"]
    assert made["fleetline"]["FLEETLINE_DATABASE_URL"] == (
        f"postgresql://fleetline:{db['FLEETLINE_DB_PASSWORD']}"
        "@prod-fleetline-timescaledb:5432/fleetline")
    service = made["fleetline-mosquitto-auth"]["pg_service.conf"]
    assert "host=prod-fleetline-timescaledb\n" in service
    assert f"password={db['FLEETLINE_BROKER_DB_PASSWORD']}\n" in service
    grafana = made["fleetline-grafana"]
    assert grafana["FLEETLINE_GRAFANA_DB_HOST"] == "prod-fleetline-timescaledb:5432"
    assert grafana["FLEETLINE_GRAFANA_DB_USER"] == "fleetline_grafana"
    # No secret value reaches the output.
    secret = [*db.values(), made["fleetline-device-key"]["device-key-secret"],
              made["fleetline-grafana"]["GF_SECURITY_ADMIN_PASSWORD"],
              made["fleetline-grafana"]["FLEETLINE_GRAFANA_DB_PASSWORD"],
              made["fleetline-mosquitto-tls"]["tls.key"],
              *(u.split(":")[2].split("@")[0] for u in made["fleetline-mqtt"].values())]
    assert len(secret) == 10 and all(len(v) >= 32 for v in secret)
    assert not [v for v in secret if v in first.stdout + first.stderr]
    # The firmware release key: a P-256 key the api loads, never printed.
    from fleetline import releases

    release_pem = made["fleetline-release-key"]["release-key.pem"]
    (tmp_path / "release.pem").write_text(release_pem)
    releases.load_key(tmp_path / "release.pem")
    assert release_pem.splitlines()[1] not in first.stdout + first.stderr
    # The broker's certificate, signed by the CA kept beside.
    tls = made["fleetline-mosquitto-tls"]
    # Kept outside the working directory (a repository, as the README runs it).
    ca = tmp_path / "config" / "fleetline" / "ca-fleetline"
    assert not list(tmp_path.glob("fleetline-ca-*"))
    assert tls["ca.crt"] == (ca / "ca.crt").read_text() and (ca / "ca.key").exists()
    cert = tmp_path / "tls.crt"
    cert.write_text(tls["tls.crt"])
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(ca / "ca.crt"), str(cert)],
                              capture_output=True, text=True, timeout=30)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    names = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-ext",
                            "subjectAltName"], capture_output=True, text=True, timeout=30)
    assert "DNS:mqtt.example.org" in names.stdout

    # Again: nothing changes.
    again = cluster.run("fleetline")
    assert again.returncode == 0, again.stderr
    assert "created:" not in again.stdout and again.stdout.count("kept:") == len(made)
    assert cluster.secrets("fleetline") == made

    # One lost: made again from what exists, agreeing with it.
    cluster.drop("fleetline", "fleetline-mosquitto-auth")
    cluster.drop("fleetline", "fleetline")
    redo = cluster.run("fleetline")
    assert redo.returncode == 0, redo.stderr
    remade = cluster.secrets("fleetline")
    consistent(remade, "prod-")
    assert remade["fleetline"] == made["fleetline"]
    assert f"password={db['FLEETLINE_BROKER_DB_PASSWORD']}\n" in \
        remade["fleetline-mosquitto-auth"]["pg_service.conf"]


def test_make_secrets_refuses_what_it_cannot_make_agree(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, "fleetline-dev")
    assert cluster.run("fleetline-dev", "--no-tls").returncode == 0
    made = cluster.secrets("fleetline-dev")
    assert "fleetline-mosquitto-tls" not in made
    consistent(made, "dev-")
    # The services' passwords cannot be read back from their hashes.
    cluster.drop("fleetline-dev", "fleetline-mqtt")
    refused = cluster.run("fleetline-dev", "--no-tls")
    assert refused.returncode != 0 and "fleetline-mosquitto-auth" in refused.stderr
    assert "fleetline-mqtt" not in cluster.secrets("fleetline-dev")
    # A new database's passwords would not match the URLs that exist.
    cluster.drop("fleetline-dev", "fleetline-timescaledb")
    cluster.drop("fleetline-dev", "fleetline-mosquitto-auth")
    refused = cluster.run("fleetline-dev", "--no-tls")
    assert refused.returncode != 0 and "--database-url" in refused.stderr
    # Nothing without its namespace, or a prefix it cannot guess.
    assert cluster.run("elsewhere", "prod-").returncode != 0
    assert cluster.secrets("elsewhere") == {}
    assert "prefix" in cluster.run("fleetline-dev-2").stderr


def test_make_secrets_for_an_external_database(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, "fleetline")
    url = "postgresql://fleetline:s3cret@db.example.org:6432/fleet?sslmode=verify-full"
    done = cluster.run("fleetline", "--database-url", url, "--no-tls")
    assert done.returncode == 0, done.stderr
    made = cluster.secrets("fleetline")
    assert "fleetline-timescaledb" not in made
    assert made["fleetline"]["FLEETLINE_DATABASE_URL"] == url
    assert made["fleetline-grafana"]["FLEETLINE_GRAFANA_DB_HOST"] == "db.example.org:6432"
    assert made["fleetline-grafana"]["FLEETLINE_GRAFANA_DB_NAME"] == "fleet"
    assert made["fleetline-grafana"]["FLEETLINE_GRAFANA_DB_SSLMODE"] == "verify-full"
    service = made["fleetline-mosquitto-auth"]["pg_service.conf"]
    assert "host=db.example.org\nport=6432\ndbname=fleet\nuser=fleetline_broker\n" in service
    assert service.endswith("sslmode=verify-full\n")
    assert "s3cret" not in done.stdout + done.stderr
    consistent(made, "prod-")
