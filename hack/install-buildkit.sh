#!/usr/bin/env bash
# Builds the real lane's BuildKit (docs/real-lane.md, docs/builds.md): the
# file system of a rootless BuildKit image like the upstream
# `moby/buildkit:<version>-rootless`, from official Go modules at pinned
# versions, into a cache folder keyed by those versions:
#
#   buildkitd, buildctl, buildctl-daemonless.sh   github.com/moby/buildkit
#   rootlesskit                                   github.com/rootless-containers/rootlesskit/v2
#
# The rest of the upstream image comes from this machine's Debian packages
# instead of Alpine's (apt-get, only when missing): git (the build script
# clones with it), runc (BuildKit's OCI worker), newuidmap/newgidmap
# (package uidmap; with file capabilities, see below), setcap (libcap2-bin)
# and busybox-static
# (the shell and tools). Each dynamically linked program is copied with the
# shared libraries `ldd` names. The image's user is 1000 with the subordinate
# ids 100000-165535, HOME=/home/user, XDG_RUNTIME_DIR=/run/user/1000, as
# upstream.
#
# Output: `$out/rootfs.tar`, the image's one layer (owners and modes as in the
# image, setuid bits included), and `$out/IMAGE.env`, its environment. Prints
# the folder on its last line (KAPSA_BUILDKIT). If KAPSA_BUILDKIT already
# names a complete folder, nothing is built. With KAPSA_ASSETS_NO_BUILD=1
# nothing is built either: it exits 3 when the folder is not in the cache.
set -euo pipefail

BUILDKIT_VERSION="${BUILDKIT_VERSION:-0.26.2}"
# The version the upstream image of that release ships (its Dockerfile's
# ROOTLESSKIT_VERSION).
ROOTLESSKIT_VERSION="${ROOTLESSKIT_VERSION:-2.3.5}"
DEBIAN_PACKAGES=(git runc uidmap busybox-static libcap2-bin)

log() { printf '[install-buildkit] %s\n' "$*" >&2; }
# shellcheck source=lib/assets.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/assets.sh"

complete() { [ -s "$1/rootfs.tar" ] && [ -s "$1/IMAGE.env" ]; }

out="$(assets_cache_root)/buildkit-$BUILDKIT_VERSION-rootlesskit-$ROOTLESSKIT_VERSION"
cached_folder KAPSA_BUILDKIT "$out" complete
[ "$(id -u)" = 0 ] || { log "it needs root (the image's files are owned by root and by user 1000, and setcap gives newuidmap its capabilities)"; exit 2; }
command -v go >/dev/null || { log "the Go toolchain is needed to build BuildKit"; exit 1; }

install_debian_packages "${DEBIAN_PACKAGES[@]}"

export GOFLAGS="-buildvcs=false ${GOFLAGS:-}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
started=$SECONDS

buildkit="github.com/moby/buildkit"
module_dir="$(go mod download -json "$buildkit@v$BUILDKIT_VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
[ -n "$module_dir" ] && [ -f "$module_dir/go.mod" ] || { log "go mod download $buildkit@v$BUILDKIT_VERSION gave no module folder"; exit 1; }
# BuildKit's go.mod has exclude directives, which `go install pkg@version`
# refuses: build inside a copy of the module.
cp -r "$module_dir" "$work/buildkit"
chmod -R u+w "$work/buildkit"
log "building $buildkit@v$BUILDKIT_VERSION (buildkitd, buildctl; a cold build takes several minutes)"
version_flags="-X $buildkit/version.Version=v$BUILDKIT_VERSION -X $buildkit/version.Package=$buildkit"
(
  cd "$work/buildkit"
  export GOFLAGS="-mod=mod $GOFLAGS"
  CGO_ENABLED=0 go build -trimpath -tags "osusergo netgo" -ldflags "-s -w $version_flags" \
    -o "$work/bin/" ./cmd/buildkitd ./cmd/buildctl >&2
)
rootlesskit="github.com/rootless-containers/rootlesskit/v2"
log "building $rootlesskit@v$ROOTLESSKIT_VERSION ($(( SECONDS - started ))s elapsed)"
GOBIN="$work/bin" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" \
  "$rootlesskit/cmd/rootlesskit@v$ROOTLESSKIT_VERSION" >&2
[ -f "$module_dir/examples/buildctl-daemonless/buildctl-daemonless.sh" ] ||
  { log "$buildkit@v$BUILDKIT_VERSION has no examples/buildctl-daemonless/buildctl-daemonless.sh"; exit 1; }

log "assembling the image's file system ($(( SECONDS - started ))s elapsed)"
root="$work/rootfs"
mkdir -p "$root"/{usr/bin,usr/lib/git-core,usr/share/git-core/templates,etc,tmp,proc,sys,dev,run/user/1000,home/user/.local/tmp,home/user/.local/share/buildkit}
chmod 1777 "$root/tmp"
install -m 0755 "$work/bin/buildkitd" "$work/bin/buildctl" "$work/bin/rootlesskit" "$root/usr/bin/"
install -m 0755 "$module_dir/examples/buildctl-daemonless/buildctl-daemonless.sh" "$root/usr/bin/"
install -m 0755 /bin/busybox "$root/usr/bin/busybox"
for applet in $("$root/usr/bin/busybox" --list); do
  [ -e "$root/usr/bin/$applet" ] || ln -s busybox "$root/usr/bin/$applet"
done
ln -s usr/bin "$root/bin"
# A program and the shared libraries it loads, at the same paths.
copy_with_libraries() {
  local program="$1" target="$2" lib
  install -D -m "$(stat -c %a "$program")" "$program" "$root$target"
  for lib in $(ldd "$program" | grep -oE '/[^ ]+\.so[^ ]*'); do
    [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done
}
copy_with_libraries "$(command -v git)" /usr/bin/git
copy_with_libraries /usr/lib/git-core/git-remote-http /usr/lib/git-core/git-remote-http
ln -s ../../bin/git "$root/usr/lib/git-core/git"
copy_with_libraries "$(command -v runc)" /usr/bin/runc
copy_with_libraries "$(command -v newuidmap)" /usr/bin/newuidmap
copy_with_libraries "$(command -v newgidmap)" /usr/bin/newgidmap
# Debian's newuidmap/newgidmap are setuid root and open the map file as root;
# without CAP_SYS_ADMIN (a pod's case) the kernel then refuses the write. As
# Fedora ships them, they get file capabilities instead and run as the user.
chmod 0755 "$root/usr/bin/newuidmap" "$root/usr/bin/newgidmap"
setcap cap_setuid=ep "$root/usr/bin/newuidmap"
setcap cap_setgid=ep "$root/usr/bin/newgidmap"
printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\nuser:x:1000:\n' > "$root/etc/group"
echo user:100000:65536 > "$root/etc/subuid"
echo user:100000:65536 > "$root/etc/subgid"
chown -R 1000:1000 "$root/run/user/1000" "$root/home/user"
chmod 0700 "$root/run/user/1000"
tar --numeric-owner --sort=name --mtime=@0 --pax-option=delete=atime,delete=ctime --xattrs --xattrs-include=security.capability \
  -C "$root" -cf "$out/rootfs.tar.tmp" .
mv "$out/rootfs.tar.tmp" "$out/rootfs.tar"
cat > "$out/IMAGE.env" <<EOF
PATH=/usr/bin
HOME=/home/user
USER=user
XDG_RUNTIME_DIR=/run/user/1000
TMPDIR=/home/user/.local/tmp
BUILDKIT_HOST=unix:///run/user/1000/buildkit/buildkitd.sock
EOF
printf '%s\n' "$buildkit@v$BUILDKIT_VERSION" "$rootlesskit@v$ROOTLESSKIT_VERSION" \
  "debian: $(dpkg-query -W -f '${Package}=${Version} ' git runc uidmap busybox-static)" > "$out/SOURCE"
log "done in $(( SECONDS - started ))s: $out ($(du -h "$out/rootfs.tar" | cut -f1))"
echo "$out"
