#!/usr/bin/env bash
# Builds the real lane's certificate authority side (docs/real-lane.md) from
# official Go modules into a cache folder keyed by their versions, the way
# hack/install-traefik.sh builds Traefik:
#
#   cert-manager-controller, acmesolver   github.com/cert-manager/cert-manager
#   crds/*.yaml                           the same module's CRDs
#   pebble, pebble-challtestsrv           github.com/letsencrypt/pebble/v2
#
# cert-manager is pinned to 1.11.5, the newest release whose binaries are
# packages of the module the Go module proxy serves: from 1.12 on, cmd/* are
# nested modules of their own, and the proxy serves none of them. Its CRDs
# are the release's deploy/crds files; the Helm label templates in their
# metadata are removed (the files are otherwise used as shipped). The
# controller runs outside the cluster against the kubeconfig; acmesolver
# becomes an image in the lane's registry (the HTTP-01 solver pod).
#
# Prints the folder on its last line (KAPSA_CERT_MANAGER). If
# KAPSA_CERT_MANAGER already names a complete folder, nothing is built. With
# KAPSA_ASSETS_NO_BUILD=1 nothing is built either: it exits 3 when the
# folder is not in the cache yet.
set -euo pipefail

CERT_MANAGER_VERSION="${CERT_MANAGER_VERSION:-1.11.5}"
PEBBLE_VERSION="${PEBBLE_VERSION:-2.10.3}"
BINARIES=(cert-manager-controller acmesolver pebble pebble-challtestsrv)

log() { printf '[install-cert-manager] %s\n' "$*" >&2; }

complete() {
  local dir="$1" b
  for b in "${BINARIES[@]}"; do [ -x "$dir/$b" ] || return 1; done
  [ -s "$dir/crds/crd-certificates.yaml" ]
}

# shellcheck source=lib/assets.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/assets.sh"
out="$(assets_cache_root)/cert-manager-$CERT_MANAGER_VERSION-pebble-$PEBBLE_VERSION"
cached_folder KAPSA_CERT_MANAGER "$out" complete

command -v go >/dev/null || { log "the Go toolchain is needed to build cert-manager and Pebble"; exit 1; }
export GOFLAGS="-buildvcs=false ${GOFLAGS:-}"
mkdir -p "$out/crds"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

pebble="github.com/letsencrypt/pebble/v2"
log "building $pebble@v$PEBBLE_VERSION"
GOBIN="$work/bin" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" \
  "$pebble/cmd/pebble@v$PEBBLE_VERSION" "$pebble/cmd/pebble-challtestsrv@v$PEBBLE_VERSION" >&2

# cert-manager's go.mod has a replace directive, which `go install
# pkg@version` refuses: build inside a copy of the module.
module="github.com/cert-manager/cert-manager@v$CERT_MANAGER_VERSION"
log "fetching $module"
dir="$(go mod download -json "$module" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
[ -n "$dir" ] && [ -f "$dir/go.mod" ] || { log "go mod download $module gave no module folder"; exit 1; }
cp -r "$dir" "$work/cert-manager"
chmod -R u+w "$work/cert-manager"
(
  cd "$work/cert-manager"
  export GOFLAGS="-mod=mod $GOFLAGS"
  go mod download >&2
  log "building cert-manager $CERT_MANAGER_VERSION (a cold build takes several minutes)"
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$work/bin/acmesolver" ./cmd/acmesolver >&2
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$work/bin/cert-manager-controller" ./cmd/controller >&2
)
for f in "$dir"/deploy/crds/crd-*.yaml; do
  sed '/{{/d' "$f" > "$out/crds/$(basename "$f")"
done
for b in "${BINARIES[@]}"; do mv "$work/bin/$b" "$out/$b"; done
printf '%s\n' "$module" "$pebble@v$PEBBLE_VERSION" > "$out/SOURCE"
log "done: $out"
echo "$out"
