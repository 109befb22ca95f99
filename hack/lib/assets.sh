# Shared by the hack/install-*.sh scripts that build into the versioned asset
# cache (sourced, not run). The caller defines `log`.

# The folder that holds the versioned asset folders.
assets_cache_root() {
  echo "${KAPSA_ASSETS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kapsa/assets}"
}

# cached_folder ENV_VAR FOLDER COMPLETE: prints a complete folder and exits 0:
# the one ENV_VAR names if COMPLETE (a function taking a folder) says it is
# complete, else FOLDER if it is. With KAPSA_ASSETS_NO_BUILD=1 it exits 3 when
# neither is. Otherwise it returns, and the caller builds FOLDER.
cached_folder() {
  local env_var="$1" out="$2" complete="$3" given="${!1:-}"
  if [ -n "$given" ] && "$complete" "$given"; then
    log "using $env_var=$given"
    echo "$given"
    exit 0
  fi
  if "$complete" "$out"; then
    log "cached in $out"
    echo "$out"
    exit 0
  fi
  if [ "${KAPSA_ASSETS_NO_BUILD:-}" = 1 ]; then
    log "not built yet ($out incomplete)"
    exit 3
  fi
}

# missing_debian_packages PACKAGE...: prints those not installed, one per line.
missing_debian_packages() {
  local p
  for p in "$@"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

# install_debian_packages PACKAGE...: installs with apt-get those not
# installed yet (updating the package lists only if the first try fails).
install_debian_packages() {
  local missing
  mapfile -t missing < <(missing_debian_packages "$@")
  [ "${#missing[@]}" -gt 0 ] || return 0
  command -v apt-get >/dev/null || { log "missing ${missing[*]} and no apt-get to install them"; exit 1; }
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${missing[@]}" >&2 ||
    { apt-get update >&2 && apt-get install -y --no-install-recommends "${missing[@]}" >&2; }
}
