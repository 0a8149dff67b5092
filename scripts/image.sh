#!/usr/bin/env bash
# make image: build deploy/Dockerfile with podman, from a Debian base made locally by
# mmdebstrap (no image registry needed). Idempotent; as root.
#
#   GOLEASH_CACHE   the base tarball is cached here (image/debian-bookworm-minbase.tar)
#   GOLEASH_IMAGE   the tag to build (default localhost/goleash:0.1.0)
#
# This kind of VM needs runc (crun refuses its hybrid cgroup layout), the cgroupfs
# manager, and explicit ulimits (root lacks CAP_SYS_RESOURCE to raise podman's
# defaults): scripts/podman.sh carries those flags for every podman call.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${GOLEASH_CACHE:-/var/cache/goleash}
image=${GOLEASH_IMAGE:-localhost/goleash:0.1.0}
base=localhost/debian:bookworm-slim
podman=("$here/scripts/podman.sh")

log() { printf 'image: %s\n' "$*"; }
die() { printf 'image: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (podman with host mounts, mmdebstrap): sudo make image"

debs=(podman mmdebstrap runc)
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

# The Dockerfile's FROM debian:bookworm-slim resolves to this local image first.
if ! "${podman[@]}" image exists "$base"; then
  tarball="$cache/image/debian-bookworm-minbase.tar"
  if [ ! -s "$tarball" ]; then
    log "making the Debian base with mmdebstrap (cached as $tarball)"
    mkdir -p "$cache/image"
    mmdebstrap --quiet --variant=minbase --format=tar bookworm "$tarball.partial"
    mv "$tarball.partial" "$tarball"
  fi
  log "importing $tarball as $base"
  "${podman[@]}" import -q "$tarball" "$base" >/dev/null
fi

# pip behind a TLS-inspecting proxy: the host's CA bundle, mounted for RUN steps only
# (nothing of it stays in the image).
cert=()
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
  cert=(--volume "$PIP_CERT:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
fi

start=$(date +%s)
log "building $image from deploy/Dockerfile"
"${podman[@]}" build --pull=never --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  --ignorefile "$here/deploy/Dockerfile.dockerignore" "${cert[@]}" \
  -f "$here/deploy/Dockerfile" -t "$image" "$here"
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$image")
log "built $image in $(( $(date +%s) - start )) s, $(( size / 1000000 )) MB"
