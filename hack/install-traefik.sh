#!/usr/bin/env bash
# Builds Traefik, the real lane's ingress controller (docs/real-lane.md), from
# its official Go module github.com/traefik/traefik/v3 at a pinned version,
# into a cache folder keyed by that version, the way hack/install-real-lane.sh
# builds the node. Traefik runs outside the cluster against the local control
# plane (its Kubernetes Ingress and Gateway API providers) and listens on
# loopback ports.
#
# The build happens inside a copy of the module (its go.mod has replace
# directives, which `go install pkg@version` refuses). Pinned to 3.6.12:
# 3.7.x replaces a module (github.com/containous/go-http-auth) at a version
# the Go module proxy does not serve.
#
# Prints the folder on its last line (KAPSA_TRAEFIK). If KAPSA_TRAEFIK already
# names a folder with the binary, nothing is built. With
# KAPSA_ASSETS_NO_BUILD=1 nothing is built either: it exits 3 when the binary
# is not in the cache yet.
set -euo pipefail

TRAEFIK_VERSION="${TRAEFIK_VERSION:-3.6.12}"

log() { printf '[install-traefik] %s\n' "$*" >&2; }

if [ -n "${KAPSA_TRAEFIK:-}" ] && [ -x "$KAPSA_TRAEFIK/traefik" ]; then
  log "using KAPSA_TRAEFIK=$KAPSA_TRAEFIK"
  echo "$KAPSA_TRAEFIK"
  exit 0
fi

cache_root="${KAPSA_ASSETS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kapsa/assets}"
out="$cache_root/traefik-$TRAEFIK_VERSION"
if [ -x "$out/traefik" ]; then
  log "cached in $out"
  echo "$out"
  exit 0
fi

if [ "${KAPSA_ASSETS_NO_BUILD:-}" = 1 ]; then
  log "not built yet ($out/traefik missing)"
  exit 3
fi
command -v go >/dev/null || { log "the Go toolchain is needed to build Traefik"; exit 1; }
module="github.com/traefik/traefik/v3@v$TRAEFIK_VERSION"
log "fetching $module"
dir="$(go mod download -json "$module" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
[ -n "$dir" ] && [ -f "$dir/go.mod" ] || { log "go mod download $module gave no module folder"; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$dir" "$work/traefik"
chmod -R u+w "$work/traefik"
cd "$work/traefik"
# Extra go flags (e.g. GOFLAGS=-p=1 on a busy machine) are kept.
export GOFLAGS="-mod=mod -buildvcs=false ${GOFLAGS:-}"
log "building traefik $TRAEFIK_VERSION (a cold build takes several minutes)"
go mod download >&2
mkdir -p "$out"
CGO_ENABLED=0 go build -trimpath \
  -ldflags "-s -w -X github.com/traefik/traefik/v3/pkg/version.Version=$TRAEFIK_VERSION" \
  -o "$out/traefik.tmp" ./cmd/traefik >&2
mv "$out/traefik.tmp" "$out/traefik"
echo "$module" > "$out/SOURCE"
log "done: $out"
echo "$out"
