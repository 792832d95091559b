#!/usr/bin/env bash
# Build the CPU image of docker/Dockerfile with no registry and no Docker daemon: buildah (Debian
# package) with vfs storage and chroot isolation, FROM a Debian bookworm made here by debootstrap
# (from the Debian mirror) plus docker/Dockerfile.local-base, a stand-in for rayproject/ray.
# tests/test_container_build.py (slow) builds with it and serves /health from the result.
#
#   docker/build-offline.sh [TAG]                      (default localhost/genserve:offline)
#   env: STORE      buildah storage root (default $GENSERVE_WORK/buildah; the rootfs is cached there)
#        PIP_CONF   a pip.conf the install step uses (mounted read-only at /etc/pip.conf, not kept)
#        MOUNTS     space-separated host paths the install step may read (indexes, wheel dirs, CA)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-localhost/genserve:offline}
store=${STORE:-${GENSERVE_WORK:-$PWD/.work}/buildah}
for cmd in buildah debootstrap; do
  command -v "$cmd" >/dev/null || { echo "needs $cmd (apt-get install -y buildah debootstrap)" >&2; exit 3; }
done
mkdir -p "$store"
B=(buildah --storage-driver vfs --root "$store/root" --runroot "$store/run")
debian=localhost/debian-local:bookworm
if ! "${B[@]}" inspect --type image "$debian" >/dev/null 2>&1; then
  if [ ! -f "$store/bookworm.tar" ]; then
    rm -rf "$store/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
      "$store/rootfs" http://deb.debian.org/debian >"$store/debootstrap.log"
    tar -C "$store/rootfs" -cf "$store/bookworm.tar" . && rm -rf "$store/rootfs"
  fi
  ctr=$("${B[@]}" from scratch)
  "${B[@]}" add "$ctr" "$store/bookworm.tar" / >/dev/null
  "${B[@]}" commit -q "$ctr" "$debian" >/dev/null
  "${B[@]}" rm "$ctr" >/dev/null
fi
vols=()
[ -z "${PIP_CONF:-}" ] || vols+=(-v "$PIP_CONF:/etc/pip.conf:ro")
for m in ${MOUNTS:-}; do vols+=(-v "$m:$m:ro"); done
"${B[@]}" bud -q --isolation chroot -f docker/Dockerfile.local-base -t localhost/ray-local:stand-in .
"${B[@]}" bud --isolation chroot "${vols[@]}" -f docker/Dockerfile -t "$tag" \
  --build-arg BASE_IMAGE=localhost/ray-local:stand-in --build-arg VARIANT=cpu .
