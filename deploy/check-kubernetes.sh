#!/usr/bin/env bash
# Offline checks of deploy/kubernetes and its HA variant deploy/kubernetes/ha
# (no cluster needed):
#   1. renders the kustomization with `kubectl kustomize` (skipped, with a
#      message, when kubectl is missing: then step 2 checks the files it
#      lists one by one);
#   2. validates every resource against the Kubernetes OpenAPI schemas in
#      strict mode (unknown fields are errors) with kubernetes-validate from
#      PyPI, which bundles the schemas, for each version in K8S_VERSIONS
#      (default: 1.30.0, the oldest the manifests support, as the worker's
#      securityContext.appArmorProfile is new in 1.30, and 1.37.0).
# `kubectl apply --dry-run=client` is not used: it asks a server for the
# API's resources, so it needs a cluster.
#
#   deploy/check-kubernetes.sh
# Environment: K8S_VENV (the venv for kubernetes-validate, kept for reuse;
# default /tmp/distbuild-k8s-venv), K8S_VERSIONS.
set -euo pipefail
cd "$(dirname "$0")/.."

dirs=(deploy/kubernetes deploy/kubernetes/ha)
venv=${K8S_VENV:-/tmp/distbuild-k8s-venv}
versions=${K8S_VERSIONS:-1.30.0 1.37.0}
validator_version=1.37.0

log() { printf 'check-kubernetes: %s\n' "$*" >&2; }
tmp=$(mktemp -d /tmp/distbuild-k8s.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

files=()
for dir in "${dirs[@]}"; do
  if command -v kubectl >/dev/null; then
    out="$tmp/$(echo "$dir" | tr / _).yaml"
    kubectl kustomize "$dir" >"$out" || { log "kubectl kustomize $dir failed"; exit 1; }
    log "rendered $dir with $(kubectl version --client 2>/dev/null | head -n 1): $(grep -c '^kind:' "$out") resources ($(awk '/^kind:/ { print $2 }' "$out" | sort | paste -sd, -))"
    files+=("$out")
  else
    log "kubectl is not installed: $dir is not rendered; checking the files it lists"
    n=${#files[@]}
    while read -r f; do files+=("$dir/$f"); done < <(awk '/^resources:/ { on = 1; next } on && /^ *- / { print $2; next } on && /^[^ ]/ { on = 0 }' "$dir/kustomization.yaml")
    [ "${#files[@]}" -gt "$n" ] || { log "no resources listed in $dir/kustomization.yaml"; exit 1; }
  fi
done

if ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$validator_version"; then
  log "installing kubernetes-validate==$validator_version into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$validator_version"
fi

status=0
for v in $versions; do
  if "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "${files[@]}" >"$tmp/out" 2>&1; then
    log "valid against Kubernetes $v (strict): ${files[*]##*/}"
  else
    cat "$tmp/out" >&2
    log "NOT valid against Kubernetes $v"
    status=1
  fi
done
exit "$status"
