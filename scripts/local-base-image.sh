#!/usr/bin/env bash
# Make the Dockerfile's base image locally, for machines that reach a Debian mirror but no container registry.
#
#   docker build --build-arg PYTHON_IMAGE="$(scripts/local-base-image.sh)" --target serve -t torchferry-serve .
#
# debootstrap (minbase) Debian bookworm from the mirror apt is configured with, with python3 (3.11, as the public
# python:3.11-slim-bookworm), python3-venv and python-is-python3, then `docker import`. The machine's local CA
# certificates (/usr/local/share/ca-certificates, e.g. a TLS-intercepting proxy's) are trusted inside, so pip
# works in a build: that makes it a test image only, never a base for an image you publish (the Dockerfile's
# default FROM stays the public image). Needs root, debootstrap and a running dockerd; prints the image name.
#
# Cached by content: the tag is a hash of this script, the mirror, the suite and the CA certificates. An image
# with that tag is reused as is; the root filesystem tarball is kept in $TORCHFERRY_BASE_CACHE
# (default ~/.cache/torchferry/base) so that a Docker store wiped since is refilled by an import, not a bootstrap.
# Environment: TORCHFERRY_DEBIAN_MIRROR (default: apt's first Debian mirror), TORCHFERRY_DEBIAN_SUITE (bookworm).
set -euo pipefail

suite="${TORCHFERRY_DEBIAN_SUITE:-bookworm}"
packages="python3,python3-venv,python-is-python3,ca-certificates"

apt_mirror() {
    # The first Debian archive URI in apt's sources (deb822 .sources files or one-line .list files).
    local uri
    uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
    if [ -z "$uri" ]; then
        uri=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
              | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' | grep -v -- '-security' | head -n1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}
mirror="${TORCHFERRY_DEBIAN_MIRROR:-$(apt_mirror)}"

command -v docker >/dev/null || { echo "local-base-image: docker not found" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "local-base-image: dockerd is not reachable (docker info failed)" >&2; exit 1; }

certs=$(find /usr/local/share/ca-certificates -type f -name '*.crt' 2>/dev/null | LC_ALL=C sort || true)
key=$( { cat "$0"; echo "$mirror $suite $packages"; for c in $certs; do sha256sum "$c"; done; } | sha256sum | cut -c1-16)
image="torchferry-local/python:3.11-${suite}-${key}"

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "$image"
    exit 0
fi

cache="${TORCHFERRY_BASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/torchferry/base}"
tarball="$cache/rootfs-${suite}-${key}.tar"
mkdir -p "$cache"
if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || { echo "local-base-image: debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
    [ "$(id -u)" -eq 0 ] || { echo "local-base-image: debootstrap needs root" >&2; exit 1; }
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/torchferry-rootfs.XXXXXX")
    trap 'rm -rf "$rootfs" "$tarball.part"' EXIT
    echo "local-base-image: debootstrap $suite from $mirror (a few minutes, once)" >&2
    debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >&2
    for c in $certs; do cp "$c" "$rootfs/usr/local/share/ca-certificates/"; done
    chroot "$rootfs" update-ca-certificates >&2
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
    tar --numeric-owner -C "$rootfs" -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
fi
# pip reads the system store through PIP_CERT (its own bundle would not know the local CAs).
docker import \
    --change 'ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python"]' \
    "$tarball" "$image" >/dev/null
echo "$image"
