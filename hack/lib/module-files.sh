# Shared by the hack/install-*-crds.sh scripts (sourced, not run): copies
# files that an official Go module ships (CRDs, nothing written by hand) into
# a cache folder keyed by the module's version, the way
# hack/install-control-plane.sh caches the control plane, and prints the
# folder on its last line.
#
# module_files TAG ENV_VAR MODULE VERSION SUBDIR CACHE_NAME FILE...
#   TAG         the log prefix, e.g. install-gateway-api-crds
#   ENV_VAR     a variable that may already name a complete folder (used as is)
#   MODULE      the Go module path, e.g. sigs.k8s.io/gateway-api
#   VERSION     its version without the v, e.g. 1.6.3
#   SUBDIR      the folder inside the module that holds the files
#   CACHE_NAME  the cache folder's name, e.g. gateway-api-crds-1.6.3
#   FILE...     the files to copy
module_files() {
  local tag="$1" env_var="$2" module="$3" version="$4" subdir="$5" cache_name="$6"
  shift 6
  local files=("$@") given="${!env_var:-}" f
  log() { printf '[%s] %s\n' "$tag" "$*" >&2; }
  complete() {
    local dir="$1" f
    for f in "${files[@]}"; do [ -s "$dir/$f" ] || return 1; done
  }
  if [ -n "$given" ] && complete "$given"; then
    log "using $env_var=$given"
    echo "$given"
    return 0
  fi
  local cache_root="${KAPSA_ASSETS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kapsa/assets}"
  local out="$cache_root/$cache_name"
  if complete "$out"; then
    log "cached in $out"
    echo "$out"
    return 0
  fi
  command -v go >/dev/null || { log "the Go toolchain is needed to fetch $module"; return 1; }
  local at="$module@v$version" dir
  log "fetching $at"
  dir="$(go mod download -json "$at" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
  [ -n "$dir" ] && [ -d "$dir/$subdir" ] || {
    log "go mod download $at gave no $subdir folder"
    return 1
  }
  mkdir -p "$out"
  for f in "${files[@]}"; do
    cp "$dir/$subdir/$f" "$out/$f.tmp"
    chmod 0644 "$out/$f.tmp"
    mv "$out/$f.tmp" "$out/$f"
  done
  echo "$at" > "$out/SOURCE"
  log "done: $out"
  echo "$out"
}
