#!/usr/bin/env bash
# Removes what a real node of the real lane (docs/real-lane.md) left behind
# when its process was killed before its teardown ran (SIGKILL, SIGTERM to a
# test binary, a crash): pod processes and containerd shims, mounts under the
# node's folder, the pods' bridge and its veths, the iptables chains kubelet
# made, the kubepods cgroups and the host paths the lane creates, and the
# folders of control planes whose process is gone.
# RealNode::start refuses to start while they are there.
#
# It refuses to run while the process that owns a node folder
# (/tmp/kapsa-testenv/node-<pid>-…) is alive: that node is in use.
# The sysctls kubelet changes are left as they are (their values before the
# node started were known only to the killed process).
set -euo pipefail

log() { printf '[clean-real-lane] %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { log "it needs root"; exit 2; }

root="${TMPDIR:-/tmp}/kapsa-testenv"
nodes=()
for dir in "$root"/node-*; do
  [ -d "$dir" ] || continue
  pid="$(basename "$dir" | cut -d- -f2)"
  if kill -0 "$pid" 2>/dev/null; then
    log "$dir belongs to process $pid, which still runs: stop it first"
    exit 1
  fi
  nodes+=("$dir")
done

# Pod processes (in kubepods cgroups) and the shims of those nodes' containerd.
for round in 1 2 3 4 5; do
  pids="$(cat /sys/fs/cgroup/*/kubepods/cgroup.procs /sys/fs/cgroup/*/kubepods/*/cgroup.procs \
    /sys/fs/cgroup/*/kubepods/*/*/cgroup.procs /sys/fs/cgroup/*/kubepods/*/*/*/cgroup.procs \
    /sys/fs/cgroup/kubepods*/cgroup.procs 2>/dev/null | sort -u || true)"
  for dir in "${nodes[@]}"; do
    pids+=" $(pgrep -f "containerd-shim-runc-v2 .*-address $dir/" || true)"
  done
  pids="$(echo $pids)"
  [ -n "$pids" ] || break
  log "killing $(echo $pids | wc -w) leftover processes (round $round)"
  kill -9 $pids 2>/dev/null || true
  sleep 0.5
done

# Mounts under the node folders, deepest first.
for dir in "${nodes[@]}"; do
  for m in $(awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" || true
  done
done

# The bridge and its veths.
if ip link show kapsa-cni0 >/dev/null 2>&1; then
  for veth in $(ip -o link show master kapsa-cni0 | awk -F': ' '{print $2}' | cut -d@ -f1); do
    ip link delete "$veth" || true
  done
  ip link delete kapsa-cni0
  log "deleted the bridge kapsa-cni0"
fi

# kubelet's iptables chains (KUBE-*) and the jumps to them.
for ipt in iptables ip6tables; do
  command -v "$ipt" >/dev/null || continue
  for table in filter nat mangle; do
    jumps="$("$ipt" -t "$table" -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j KUBE-' | grep -vE '^-A KUBE-' || true)"
    while read -r rule; do
      [ -n "$rule" ] || continue
      # shellcheck disable=SC2086
      "$ipt" -t "$table" -D ${rule#-A } || true
    done <<< "$jumps"
    for chain in $("$ipt" -t "$table" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}'); do
      "$ipt" -t "$table" -F "$chain" || true
    done
    for chain in $("$ipt" -t "$table" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}'); do
      "$ipt" -t "$table" -X "$chain" || true
    done
  done
done

# The kubepods cgroup trees.
for tree in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods*; do
  [ -d "$tree" ] || continue
  find "$tree" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  if [ -d "$tree" ]; then log "could not remove $tree (processes left in it?)"; fi
done

# Host paths the lane's processes create whatever their configuration.
rm -rf /run/containerd/s /var/lib/kubelet/device-plugins /var/log/containers /var/lib/cni/results
for d in /run/containerd /var/lib/kubelet /var/lib/cni; do
  rmdir "$d" 2>/dev/null || true
done

for dir in "${nodes[@]}"; do
  if awk -v d="$dir/" 'index($2, d) == 1 {found=1} END {exit !found}' /proc/mounts; then
    log "kept $dir: something is still mounted in it"
  else
    rm -rf "$dir"
  fi
done
# Control-plane folders (/tmp/kapsa-testenv/cp-<pid>-…) of processes that
# are gone: their etcd data and logs.
for dir in "$root"/cp-*; do
  [ -d "$dir" ] || continue
  pid="$(basename "$dir" | cut -d- -f2)"
  kill -0 "$pid" 2>/dev/null || rm -rf "$dir"
done
left="$(find /sys/fs/cgroup -maxdepth 2 -name 'kubepods*' | head -1)"
[ -z "$left" ] || { log "still there: $left"; exit 1; }
log "clean: ${#nodes[@]} node folder(s) removed"
