#!/usr/bin/env bash
# Builds Helm, which the chart test (crates/kapsa/tests/chart.rs) runs to lint
# and render charts/kapsa, from its official Go module (helm.sh/helm/v3) at a
# pinned version, into a cache folder keyed by that version, the same way
# hack/install-control-plane.sh builds the control plane. Prints the path of
# the helm binary on its last line (hack/test.sh exports it as KAPSA_HELM).
#
# If KAPSA_HELM already names an executable, nothing is built.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-3.22.0}"

log() { printf '[install-helm] %s\n' "$*" >&2; }

if [ -n "${KAPSA_HELM:-}" ] && [ -x "$KAPSA_HELM" ]; then
  log "using KAPSA_HELM=$KAPSA_HELM"
  echo "$KAPSA_HELM"
  exit 0
fi

cache_root="${KAPSA_ASSETS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kapsa/assets}"
out="$cache_root/helm-$HELM_VERSION"
if [ -x "$out/helm" ]; then
  log "cached in $out"
  echo "$out/helm"
  exit 0
fi

command -v go >/dev/null || { log "the Go toolchain is needed to build helm"; exit 1; }
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export GOFLAGS="-mod=mod -buildvcs=false"
# Upstream builds helm without cgo (its Makefile's CGO_ENABLED ?= 0).
export CGO_ENABLED=0
started=$SECONDS

log "building helm v$HELM_VERSION (a few minutes on 2 cores)"
cd "$work"
go mod init kapsa.dev/assets/helm >/dev/null 2>&1
go get "helm.sh/helm/v3@v$HELM_VERSION" >&2
# The flags upstream's Makefile sets for a tagged build. Helm's default
# Kubernetes version (the Capabilities.KubeVersion of `helm template`, and
# what `helm lint` checks deprecated APIs against) follows its client-go:
# v0.X.Y is Kubernetes 1.X.
client_go="$(go list -f '{{.Version}}' -m k8s.io/client-go)"
k8s_minor="$(echo "$client_go" | cut -d. -f2)"
ldflags="-s -w"
ldflags+=" -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION"
ldflags+=" -X helm.sh/helm/v3/internal/version.metadata="
ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1"
ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$k8s_minor"
ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1"
ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$k8s_minor"
go build -trimpath -ldflags "$ldflags" -o "$out/helm.tmp" helm.sh/helm/v3/cmd/helm >&2
mv "$out/helm.tmp" "$out/helm"

log "done in $(( SECONDS - started ))s: $out/helm"
echo "$out/helm"
