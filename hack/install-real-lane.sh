#!/usr/bin/env bash
# Builds and installs what the real lane of the local control plane needs (see
# docs/real-lane.md): a real node (kubelet + containerd + runc + bridge CNI) and a
# container registry on loopback that the node pulls from.
#
# From official Go modules at pinned versions, into a cache folder keyed by
# those versions (the same way hack/install-control-plane.sh builds the control
# plane): kubelet, containerd, containerd-shim-runc-v2, ctr, registry
# (distribution), crane, and a static `pause` program. From Debian (apt-get,
# only when missing): runc, containernetworking-plugins, iptables,
# busybox-static. Prints the folder on its last line (KAPSA_REAL_LANE_ASSETS).
#
# Exits 2 with a message when the machine cannot run the lane (not Linux, not
# root, no cgroups); 1 on any other failure. With KAPSA_ASSETS_NO_BUILD=1 it
# installs and builds nothing: it prints the folder if everything is there
# already, and exits 3 otherwise.
set -euo pipefail

KUBERNETES_VERSION="${KUBERNETES_VERSION:-1.36.3}"
CONTAINERD_VERSION="${CONTAINERD_VERSION:-2.4.2}"
REGISTRY_VERSION="${REGISTRY_VERSION:-3.1.2}"
CRANE_VERSION="${CRANE_VERSION:-0.22.1}"
BINARIES=(kubelet containerd containerd-shim-runc-v2 ctr registry crane pause busybox)
DEBIAN_PACKAGES=(runc containernetworking-plugins iptables busybox-static)

log() { printf '[install-real-lane] %s\n' "$*" >&2; }
cannot() { log "this machine cannot run the real lane: $*"; exit 2; }

# --- can this machine run the lane at all? ---------------------------------
[ "$(uname -s)" = Linux ] || cannot "it needs Linux (this is $(uname -s))"
[ "$(id -u)" = 0 ] || cannot "it needs root (kubelet, containerd and runc manage cgroups, mounts, network namespaces and iptables)"
if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" != cgroup2fs ] && [ ! -d /sys/fs/cgroup/memory ]; then
  cannot "no cgroup support (neither cgroup v2 nor the v1 memory controller is mounted under /sys/fs/cgroup)"
fi
[ "$(uname -m)" = x86_64 ] || cannot "it is only set up for linux/amd64 (this is $(uname -m))"

# shellcheck source=lib/assets.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/assets.sh"
out="$(assets_cache_root)/real-lane-k8s-$KUBERNETES_VERSION-containerd-$CONTAINERD_VERSION-registry-$REGISTRY_VERSION-crane-$CRANE_VERSION"

# --- Debian packages ----------------------------------------------------------
if [ "${KAPSA_ASSETS_NO_BUILD:-}" = 1 ]; then
  for b in "${BINARIES[@]}"; do [ -x "$out/$b" ] || { log "not built yet ($out/$b missing)"; exit 3; }; done
  missing="$(missing_debian_packages "${DEBIAN_PACKAGES[@]}" | tr '\n' ' ')"
  [ -z "$missing" ] || { log "not installed yet: $missing"; exit 3; }
  echo "$out"
  exit 0
fi
install_debian_packages "${DEBIAN_PACKAGES[@]}"

# --- binaries built from Go modules -------------------------------------------
has_all() {
  local dir="$1"
  for b in "${BINARIES[@]}"; do [ -x "$dir/$b" ] || return 1; done
}

if has_all "$out"; then
  log "cached in $out"
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { log "the Go toolchain is needed to build the real lane"; exit 1; }
command -v gcc >/dev/null || { log "gcc is needed to build the static pause program"; exit 1; }
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Extra go flags (e.g. GOFLAGS=-p=1 on a busy machine) are kept.
export GOFLAGS="-mod=mod -buildvcs=false ${GOFLAGS:-}"
started=$SECONDS

build_step() { log "[$1] $2 ($(( SECONDS - started ))s elapsed)"; }

if [ ! -x "$out/pause" ] || [ ! -x "$out/busybox" ]; then
  build_step 1/5 "building a static pause program, copying Debian's static busybox"
  # The sandbox ("pause") container's only process: it holds the pod's
  # namespaces, reaps zombies, and exits on SIGINT/SIGTERM.
  cat > "$work/pause.c" <<'C'
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction q = { .sa_handler = quit }, r = { .sa_handler = reap, .sa_flags = SA_NOCLDSTOP };
  sigaction(SIGINT, &q, NULL);
  sigaction(SIGTERM, &q, NULL);
  sigaction(SIGCHLD, &r, NULL);
  for (;;) pause();
}
C
  gcc -static -Os -s -o "$out/pause.tmp" "$work/pause.c" >&2
  mv "$out/pause.tmp" "$out/pause"
  cp /bin/busybox "$out/busybox.tmp"
  mv "$out/busybox.tmp" "$out/busybox"
fi

if [ ! -x "$out/crane" ]; then
  build_step 2/5 "building crane v$CRANE_VERSION"
  mkdir -p "$work/crane" && cd "$work/crane"
  go mod init kapsa.dev/assets/crane >/dev/null 2>&1
  go get "github.com/google/go-containerregistry@v$CRANE_VERSION" >&2
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/crane.tmp" github.com/google/go-containerregistry/cmd/crane >&2
  mv "$out/crane.tmp" "$out/crane"
fi

if [ ! -x "$out/registry" ]; then
  build_step 3/5 "building the distribution registry v$REGISTRY_VERSION"
  mkdir -p "$work/registry" && cd "$work/registry"
  go mod init kapsa.dev/assets/registry >/dev/null 2>&1
  go get "github.com/distribution/distribution/v3@v$REGISTRY_VERSION" >&2
  CGO_ENABLED=0 go build -trimpath \
    -ldflags "-s -w -X github.com/distribution/distribution/v3/version.version=v$REGISTRY_VERSION" \
    -o "$out/registry.tmp" github.com/distribution/distribution/v3/cmd/registry >&2
  mv "$out/registry.tmp" "$out/registry"
fi

if [ ! -x "$out/containerd" ] || [ ! -x "$out/containerd-shim-runc-v2" ] || [ ! -x "$out/ctr" ]; then
  build_step 4/5 "building containerd, containerd-shim-runc-v2 and ctr v$CONTAINERD_VERSION"
  mkdir -p "$work/containerd" && cd "$work/containerd"
  go mod init kapsa.dev/assets/containerd >/dev/null 2>&1
  go get "github.com/containerd/containerd/v2@v$CONTAINERD_VERSION" >&2
  ctrd_flags="-X github.com/containerd/containerd/v2/version.Version=v$CONTAINERD_VERSION"
  ctrd_flags+=" -X github.com/containerd/containerd/v2/version.Package=github.com/containerd/containerd/v2"
  mkdir -p "$work/containerd-bin"
  go build -trimpath -tags "no_btrfs urfave_cli_no_docs" -ldflags "-s -w $ctrd_flags" -o "$work/containerd-bin/" \
    github.com/containerd/containerd/v2/cmd/containerd \
    github.com/containerd/containerd/v2/cmd/ctr >&2
  # Upstream builds the shim static (SHIM_CGO_ENABLED ?= 0).
  CGO_ENABLED=0 go build -trimpath -tags "no_btrfs urfave_cli_no_docs" -ldflags "-s -w $ctrd_flags" -o "$work/containerd-bin/" \
    github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 >&2
  mv "$work/containerd-bin/"* "$out/"
fi

if [ ! -x "$out/kubelet" ]; then
  build_step 5/5 "building kubelet v$KUBERNETES_VERSION"
  mkdir -p "$work/k8s" && cd "$work/k8s"
  # The same wrapper module as hack/install-control-plane.sh: k8s.io/kubernetes
  # points its staging modules at local paths; pin each to the published
  # v0.X.Y of the same release instead.
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
  go mod download >&2
  version_flags="-X k8s.io/component-base/version.gitVersion=v$KUBERNETES_VERSION"
  version_flags+=" -X k8s.io/component-base/version.gitMajor=1"
  version_flags+=" -X k8s.io/component-base/version.gitMinor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)"
  version_flags+=" -X k8s.io/component-base/version.gitTreeState=clean"
  version_flags+=" -X k8s.io/client-go/pkg/version.gitVersion=v$KUBERNETES_VERSION"
  go build -trimpath -ldflags "-s -w $version_flags" -o "$out/kubelet.tmp" k8s.io/kubernetes/cmd/kubelet >&2
  mv "$out/kubelet.tmp" "$out/kubelet"
fi

log "done in $(( SECONDS - started ))s: $out"
echo "$out"
