#!/usr/bin/env bash
# Fetches the Prometheus Operator's CustomResourceDefinitions that Kapsa uses
# (ServiceMonitor and PodMonitor, monitoring.coreos.com/v1) from the official
# Go module github.com/prometheus-operator/prometheus-operator at a pinned
# version (the module ships them under example/prometheus-operator-crd/),
# into a cache folder keyed by that version, the way
# hack/install-control-plane.sh caches the control plane. Nothing is written
# by hand. Prints the folder on its last line (hack/test.sh exports it as
# KAPSA_PROMETHEUS_OPERATOR_CRDS; kapsa-testenv runs this script itself when
# that is unset).
#
# If KAPSA_PROMETHEUS_OPERATOR_CRDS already names a folder with the files,
# nothing is fetched.
set -euo pipefail

PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-0.94.1}"
FILES=(monitoring.coreos.com_servicemonitors.yaml monitoring.coreos.com_podmonitors.yaml)

log() { printf '[install-prometheus-operator-crds] %s\n' "$*" >&2; }

complete() {
  local dir="$1" f
  for f in "${FILES[@]}"; do [ -s "$dir/$f" ] || return 1; done
}

if [ -n "${KAPSA_PROMETHEUS_OPERATOR_CRDS:-}" ] && complete "$KAPSA_PROMETHEUS_OPERATOR_CRDS"; then
  log "using KAPSA_PROMETHEUS_OPERATOR_CRDS=$KAPSA_PROMETHEUS_OPERATOR_CRDS"
  echo "$KAPSA_PROMETHEUS_OPERATOR_CRDS"
  exit 0
fi

cache_root="${KAPSA_ASSETS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kapsa/assets}"
out="$cache_root/prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION"
if complete "$out"; then
  log "cached in $out"
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { log "the Go toolchain is needed to fetch the Prometheus Operator module"; exit 1; }
module="github.com/prometheus-operator/prometheus-operator@v$PROMETHEUS_OPERATOR_VERSION"
log "fetching $module"
dir="$(go mod download -json "$module" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
[ -n "$dir" ] && [ -d "$dir/example/prometheus-operator-crd" ] || {
  log "go mod download $module gave no example/prometheus-operator-crd folder"
  exit 1
}
mkdir -p "$out"
for f in "${FILES[@]}"; do
  cp "$dir/example/prometheus-operator-crd/$f" "$out/$f.tmp"
  chmod 0644 "$out/$f.tmp"
  mv "$out/$f.tmp" "$out/$f"
done
echo "$module" > "$out/SOURCE"
log "done: $out"
echo "$out"
