#!/usr/bin/env bash
# Offline checks of the deploy files; run from anywhere: `bash deploy/k8s/check.sh`.
#  1. base/mosquitto/fleetline.conf is identical to deploy/mosquitto/fleetline.conf
#     (kustomize cannot read files outside base/, so base/ keeps a copy).
#  2. Both overlays render with `kubectl kustomize`.
#  3. The rendered manifests validate against the Kubernetes 1.30 schemas, unknown fields
#     rejected (kubernetes-validate: the dev extra installs it; KUBERNETES_VALIDATE names
#     it when it is not on PATH). Without it the check fails.
#  4. The prod overlay renders with each optional component, added to its `components:`
#     as an operator would (so the overlay's prefix and namespace apply to it), and holds
#     what the component adds. Those made of Kubernetes kinds only (ingress, autoscaling)
#     validate like the overlays; cert-manager's Certificate and the Prometheus Operator's
#     ServiceMonitor are custom kinds that the schemas do not know.
#  5. make-secrets.sh parses (bash -n) and passes shellcheck (make test installs it).
#  6. The Grafana dashboards are what fleetline_dev/grafana renders (needs the dev extra).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

if ! diff -u deploy/mosquitto/fleetline.conf deploy/k8s/base/mosquitto/fleetline.conf; then
    echo "deploy/k8s/base/mosquitto/fleetline.conf differs from deploy/mosquitto/fleetline.conf:" >&2
    echo "  cp deploy/mosquitto/fleetline.conf deploy/k8s/base/mosquitto/fleetline.conf" >&2
    exit 1
fi
echo "ok: mosquitto fleetline.conf copy matches"

validate="${KUBERNETES_VALIDATE:-$(command -v kubernetes-validate || true)}"
if [[ -z "$validate" ]]; then
    echo "kubernetes-validate is not installed: pip install kubernetes-validate (the dev extra)," >&2
    echo "  or name it with KUBERNETES_VALIDATE=path/to/kubernetes-validate" >&2
    exit 1
fi
for overlay in dev prod; do
    rendered="$(kubectl kustomize "deploy/k8s/overlays/$overlay")"
    echo "ok: overlays/$overlay renders ($(grep -c '^kind:' <<<"$rendered") resources)"
    "$validate" --strict -k 1.30.0 --quiet - <<<"$rendered"
    echo "ok: overlays/$overlay validates (kubernetes-validate --strict -k 1.30.0)"
done

# The optional components, each added to a scratch copy of the prod overlay. The copy
# sits beside the overlays, so the overlay's relative paths hold.
grep -q '^components:$' deploy/k8s/overlays/prod/kustomization.yaml
scratch="$(mktemp -d deploy/k8s/overlays/.check-XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
with_component() {
    rm -f "$scratch"/*
    cp deploy/k8s/overlays/prod/*.yaml "$scratch/"
    awk -v c="$1" '{ print } /^components:$/ { print "  - ../../components/" c }' \
        deploy/k8s/overlays/prod/kustomization.yaml >"$scratch/kustomization.yaml"
    kubectl kustomize "$scratch"
}
# count PATTERN EXPECTED TEXT: the number of lines matching PATTERN (extended regular
# expression) is EXPECTED.
count() {
    local found
    found=$(grep -cE -- "$1" <<<"$3" || true)
    if [[ "$found" != "$2" ]]; then
        echo "expected $2 line(s) matching '$1', found $found" >&2
        return 1
    fi
}

rendered="$(with_component cert-manager)"
count '^kind: Certificate$' 1 "$rendered"
count 'secretName: fleetline-mosquitto-tls' 2 "$rendered"
echo "ok: overlays/prod with components/cert-manager renders ($(grep -c '^kind:' <<<"$rendered") resources)"

rendered="$(with_component ingress)"
count '^kind: Ingress$' 1 "$rendered"
count '^  ingressClassName: nginx$' 1 "$rendered"
count '^            name: prod-fleetline-api$' 1 "$rendered"
count '^            name: prod-fleetline-grafana$' 1 "$rendered"
count 'secretName: fleetline-(api|grafana)-tls$' 2 "$rendered"
count 'name: FLEETLINE_API_FORWARDED_ALLOW_IPS' 1 "$rendered"
count 'kubernetes.io/metadata.name: ingress-nginx' 1 "$rendered"
"$validate" --strict -k 1.30.0 --quiet - <<<"$rendered"
echo "ok: overlays/prod with components/ingress renders and validates ($(grep -c '^kind:' <<<"$rendered") resources)"

rendered="$(with_component autoscaling)"
count '^kind: HorizontalPodAutoscaler$' 2 "$rendered"
count '^    name: prod-fleetline-(api|ingest)$' 2 "$rendered"
count '^      selectPolicy: Disabled$' 1 "$rendered"
count '^kind: PodDisruptionBudget$' 3 "$rendered"
count 'name: FLEETLINE_INGEST_SHARE_GROUP' 1 "$rendered"
"$validate" --strict -k 1.30.0 --quiet - <<<"$rendered"
echo "ok: overlays/prod with components/autoscaling renders and validates ($(grep -c '^kind:' <<<"$rendered") resources)"

rendered="$(with_component prometheus-operator)"
count '^kind: ServiceMonitor$' 3 "$rendered"
count '^  name: prod-fleetline-api-metrics$' 1 "$rendered"
count '^    port: metrics$' 3 "$rendered"
echo "ok: overlays/prod with components/prometheus-operator renders ($(grep -c '^kind:' <<<"$rendered") resources)"

bash -n deploy/k8s/make-secrets.sh
if ! command -v shellcheck >/dev/null; then
    echo "shellcheck is not installed: scripts/ensure-services.sh test installs it" >&2
    exit 1
fi
shellcheck deploy/k8s/make-secrets.sh deploy/k8s/components/timescaledb/initdb/fleetline.sh
echo "ok: make-secrets.sh parses; it and the database init script pass shellcheck"

python="${PYTHON:-$(command -v python3)}"
[[ -x .venv/bin/python ]] && python="${PYTHON:-.venv/bin/python}"
"$python" -m fleetline_dev.grafana --check deploy/grafana/dashboards
