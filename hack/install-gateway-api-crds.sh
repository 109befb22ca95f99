#!/usr/bin/env bash
# Fetches the Gateway API CustomResourceDefinitions of the standard channel
# (Gateway, HTTPRoute, ListenerSet and the others, gateway.networking.k8s.io)
# from the official Go module sigs.k8s.io/gateway-api at a pinned version
# (the module ships them under config/crd/standard/), into a cache folder
# keyed by that version, the way hack/install-control-plane.sh caches the
# control plane. Nothing is written by hand. Prints the folder on its last
# line (hack/test.sh exports it as KAPSA_GATEWAY_API_CRDS; kapsa-testenv runs
# this script itself when that is unset).
#
# The standard channel's ValidatingAdmissionPolicy
# (gateway.networking.k8s.io_vap_safeupgrades.yaml) is not a CRD and is not
# copied.
#
# If KAPSA_GATEWAY_API_CRDS already names a folder with the files, nothing is
# fetched.
set -euo pipefail

GATEWAY_API_VERSION="${GATEWAY_API_VERSION:-1.6.3}"
FILES=(
  gateway.networking.k8s.io_gatewayclasses.yaml
  gateway.networking.k8s.io_gateways.yaml
  gateway.networking.k8s.io_httproutes.yaml
  gateway.networking.k8s.io_grpcroutes.yaml
  gateway.networking.k8s.io_listenersets.yaml
  gateway.networking.k8s.io_referencegrants.yaml
  gateway.networking.k8s.io_backendtlspolicies.yaml
  gateway.networking.k8s.io_tcproutes.yaml
  gateway.networking.k8s.io_tlsroutes.yaml
  gateway.networking.k8s.io_udproutes.yaml
)

log() { printf '[install-gateway-api-crds] %s\n' "$*" >&2; }

complete() {
  local dir="$1" f
  for f in "${FILES[@]}"; do [ -s "$dir/$f" ] || return 1; done
}

if [ -n "${KAPSA_GATEWAY_API_CRDS:-}" ] && complete "$KAPSA_GATEWAY_API_CRDS"; then
  log "using KAPSA_GATEWAY_API_CRDS=$KAPSA_GATEWAY_API_CRDS"
  echo "$KAPSA_GATEWAY_API_CRDS"
  exit 0
fi

cache_root="${KAPSA_ASSETS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kapsa/assets}"
out="$cache_root/gateway-api-crds-$GATEWAY_API_VERSION"
if complete "$out"; then
  log "cached in $out"
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { log "the Go toolchain is needed to fetch the Gateway API module"; exit 1; }
module="sigs.k8s.io/gateway-api@v$GATEWAY_API_VERSION"
log "fetching $module"
dir="$(go mod download -json "$module" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
[ -n "$dir" ] && [ -d "$dir/config/crd/standard" ] || {
  log "go mod download $module gave no config/crd/standard folder"
  exit 1
}
mkdir -p "$out"
for f in "${FILES[@]}"; do
  cp "$dir/config/crd/standard/$f" "$out/$f.tmp"
  chmod 0644 "$out/$f.tmp"
  mv "$out/$f.tmp" "$out/$f"
done
echo "$module" > "$out/SOURCE"
log "done: $out"
echo "$out"
