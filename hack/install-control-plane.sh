#!/usr/bin/env bash
# Builds the upstream control-plane binaries Kapsa's tests and `kapsa dev` run:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and kwok,
# from their official Go modules at pinned versions, into a cache folder keyed by
# those versions. Prints the folder on its last line (use it as KUBEBUILDER_ASSETS).
#
# If KUBEBUILDER_ASSETS already names a folder holding all of them, nothing is built.
set -euo pipefail

KUBERNETES_VERSION="${KUBERNETES_VERSION:-1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-3.6.16}"
KWOK_VERSION="${KWOK_VERSION:-0.8.0}"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok)

log() { printf '[install-control-plane] %s\n' "$*" >&2; }

has_all() {
  local dir="$1"
  for b in "${BINARIES[@]}"; do [ -x "$dir/$b" ] || return 1; done
}

if [ -n "${KUBEBUILDER_ASSETS:-}" ] && has_all "$KUBEBUILDER_ASSETS"; then
  log "using KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

cache_root="${KAPSA_ASSETS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kapsa/assets}"
out="$cache_root/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"
if has_all "$out"; then
  log "cached in $out"
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { log "the Go toolchain is needed to build the control plane"; exit 1; }
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export GOFLAGS="-mod=mod -buildvcs=false"
started=$SECONDS

build_step() { log "[$1] $2 ($(( SECONDS - started ))s elapsed)"; }

if [ ! -x "$out/etcd" ]; then
  build_step 1/3 "building etcd v$ETCD_VERSION"
  mkdir -p "$work/etcd" && cd "$work/etcd"
  go mod init kapsa.dev/assets/etcd >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >&2
  go build -trimpath -ldflags "-s -w" -o "$out/etcd.tmp" go.etcd.io/etcd/server/v3 >&2
  mv "$out/etcd.tmp" "$out/etcd"
fi

if [ ! -x "$out/kwok" ]; then
  build_step 2/3 "building kwok v$KWOK_VERSION"
  mkdir -p "$work/kwok" && cd "$work/kwok"
  go mod init kapsa.dev/assets/kwok >/dev/null 2>&1
  go get "sigs.k8s.io/kwok@v$KWOK_VERSION" >&2
  go build -trimpath -ldflags "-s -w" -o "$out/kwok.tmp" sigs.k8s.io/kwok/cmd/kwok >&2
  mv "$out/kwok.tmp" "$out/kwok"
fi

k8s_missing=0
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  [ -x "$out/$b" ] || k8s_missing=1
done
if [ "$k8s_missing" = 1 ]; then
  build_step 3/3 "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl v$KUBERNETES_VERSION (the long step: tens of minutes on 2 cores)"
  mkdir -p "$work/k8s" && cd "$work/k8s"
  # k8s.io/kubernetes points its staging modules at local paths; pin each to the
  # published v0.X.Y of the same release instead.
  upstream_mod="$(go mod download -json "k8s.io/kubernetes@v$KUBERNETES_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')"
  staging_version="v0.${KUBERNETES_VERSION#1.}"
  {
    echo "module kapsa.dev/assets/kubernetes"
    echo
    echo "go $(go env GOVERSION | sed 's/^go//; s/\.[0-9]*$//')"
    echo
    echo "require k8s.io/kubernetes v$KUBERNETES_VERSION"
    echo
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging/src/k8s\.io/[a-z0-9-]+' "$upstream_mod" |
      awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
  } > go.mod
  log "wrapper module pins $(grep -c '^replace' go.mod) staging modules to $staging_version"
  go mod download >&2
  version_flags="-X k8s.io/component-base/version.gitVersion=v$KUBERNETES_VERSION"
  version_flags+=" -X k8s.io/component-base/version.gitMajor=1"
  version_flags+=" -X k8s.io/component-base/version.gitMinor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)"
  version_flags+=" -X k8s.io/component-base/version.gitTreeState=clean"
  version_flags+=" -X k8s.io/client-go/pkg/version.gitVersion=v$KUBERNETES_VERSION"
  mkdir -p "$work/k8s-bin"
  go build -trimpath -ldflags "-s -w $version_flags" -o "$work/k8s-bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl >&2
  mv "$work/k8s-bin/"* "$out/"
fi

log "done in $(( SECONDS - started ))s: $out"
echo "$out"
