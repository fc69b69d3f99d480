#!/usr/bin/env bash
# Offline checks of the deploy files; run from anywhere: `bash deploy/k8s/check.sh`.
#  1. base/mosquitto/fleetline.conf is identical to deploy/mosquitto/fleetline.conf
#     (kustomize cannot read files outside base/, so base/ keeps a copy).
#  2. Both overlays render with `kubectl kustomize`.
#  3. The rendered manifests validate against the Kubernetes 1.30 schemas, unknown fields
#     rejected (kubernetes-validate: the dev extra installs it; KUBERNETES_VALIDATE names
#     it when it is not on PATH). Without it the check fails.
#  4. The prod overlay renders with the optional cert-manager component.
#  5. The Grafana dashboards are what fleetline_dev/grafana renders (needs the dev extra).
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

# The optional cert-manager component, on the prod overlay.
scratch="$(mktemp -d deploy/k8s/.check-XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
cat >"$scratch/kustomization.yaml" <<'YAML'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../overlays/prod
components:
  - ../components/cert-manager
YAML
rendered="$(kubectl kustomize "$scratch")"
grep -q '^kind: Certificate$' <<<"$rendered"
grep -q 'secretName: fleetline-mosquitto-tls' <<<"$rendered"
echo "ok: overlays/prod with components/cert-manager renders ($(grep -c '^kind:' <<<"$rendered") resources)"

python="${PYTHON:-$(command -v python3)}"
[[ -x .venv/bin/python ]] && python="${PYTHON:-.venv/bin/python}"
"$python" -m fleetline_dev.grafana --check deploy/grafana/dashboards
