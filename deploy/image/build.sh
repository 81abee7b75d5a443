#!/usr/bin/env bash
# Builds the repository's Dockerfile as imgemb:latest with root podman, on a host that has no Docker
# daemon and reaches no image registry (only PyPI and a Debian mirror): `make image`.
#
#   deploy/image/build.sh [extra podman build args, e.g. --build-arg TORCH_INDEX_URL=...]
#
# Settings (environment):
#   IMGEMB_IMAGE_SCRATCH     podman's storage, run and temp folders (default /var/tmp/imgemb-image;
#                            several GB; `make image-clean` removes it)
#   IMGEMB_IMAGE_TAG         the tag to build (default imgemb:latest)
#   IMGEMB_DEBIAN_MIRROR     mirror for the base rootfs (default: the bookworm mirror apt uses here)
#   IMAGE_PIP_FIND_LINKS, IMAGE_PIP_EXTRA_INDEX_URL, IMAGE_PIP_CONSTRAINT
#                            local wheel sources the build may use (default: this host's pip
#                            configuration; set them empty to build from plain PyPI)
set -euo pipefail
# shellcheck source=deploy/image/common.sh
source "$(dirname "$0")/common.sh"

require_root
ensure_podman
total_started=$SECONDS

debian_mirror() {
  if [ -n "${IMGEMB_DEBIAN_MIRROR:-}" ]; then
    echo "$IMGEMB_DEBIAN_MIRROR"
    return
  fi
  # apt's own view of its sources, whatever format they are written in (sources.list or deb822).
  local uri
  # shellcheck disable=SC2016 # $(REPO_URI) is apt's placeholder, not a shell expansion
  uri="$(apt-get indextargets --format '$(REPO_URI)' 'Identifier: Packages' 'Release: bookworm' 2>/dev/null | head -n1 || true)"
  echo "${uri:-http://deb.debian.org/debian/}"
}

# The Dockerfile's FROM, built locally: a debootstrapped bookworm rootfs imported as an image, plus
# Python 3.11 (python-base.Containerfile). Skipped when the image is already in the storage (a
# registry-pulled python:3.11-slim works just as well).
ensure_base_image() {
  if podman image exists "$IMGEMB_BASE_IMAGE"; then
    echo "base image: $IMGEMB_BASE_IMAGE (present)"
    return
  fi
  local started=$SECONDS
  if ! podman image exists localhost/debian:bookworm; then
    ensure_debian_commands debootstrap:debootstrap
    local rootfs="$IMGEMB_IMAGE_SCRATCH/rootfs" mirror
    mirror="$(debian_mirror)"
    echo "bootstrapping Debian bookworm (minbase) from $mirror"
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$IMGEMB_IMAGE_SCRATCH/debootstrap.log" 2>&1 \
      || { tail -n 30 "$IMGEMB_IMAGE_SCRATCH/debootstrap.log" >&2; exit 1; }
    # debootstrap leaves its package cache; an image does not need it.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar --numeric-owner -C "$rootfs" -c . | podman import --message "debootstrap --variant=minbase bookworm $mirror" - localhost/debian:bookworm >/dev/null
    rm -rf "$rootfs"
  fi
  echo "building the python:3.11 stand-in ($IMGEMB_BASE_IMAGE)"
  podman build --pull=never --network=host --layers \
    -f "$IMAGE_DIR/python-base.Containerfile" -t "$IMGEMB_BASE_IMAGE" "$IMAGE_DIR"
  echo "base image built in $((SECONDS - started)) s"
}

# This host's pip settings, the way pip itself resolves them: environment first, then its config files.
host_pip_setting() {
  local env_name=$1 key=$2 pip=(python3 -m pip)
  if [ -n "${!env_name:-}" ]; then
    echo "${!env_name}"
    return
  fi
  # The project's venv pip reads the same global config files and is known to be recent.
  [ -x "$REPO_ROOT/.venv/bin/pip" ] && pip=("$REPO_ROOT/.venv/bin/pip")
  # `pip config list`, not `pip config get`: get misses keys that list shows (global.constraint in
  # /etc/xdg/pip/pip.conf, with pip 26).
  "${pip[@]}" config list 2>/dev/null | sed -n "s/^global\.$key='\(.*\)'\$/\1/p" | tail -n1
}

BUILD_ARGS=()
MOUNTS=()
mount_ro() {
  local path=$1
  case " ${MOUNTS[*]-} " in *" $path:$path:ro "*) return ;; esac
  MOUNTS+=(-v "$path:$path:ro")
}

# Only local sources are forwarded (a remote index needs no mount and may not suit the image);
# each is mounted read-only at the same path, so the URLs stay valid inside the build.
add_local_pip_sources() {
  local find_links extra_index constraint kept entry path
  find_links="${IMAGE_PIP_FIND_LINKS-$(host_pip_setting PIP_FIND_LINKS find-links)}"
  extra_index="${IMAGE_PIP_EXTRA_INDEX_URL-$(host_pip_setting PIP_EXTRA_INDEX_URL extra-index-url)}"
  constraint="${IMAGE_PIP_CONSTRAINT-$(host_pip_setting PIP_CONSTRAINT constraint)}"

  kept=()
  for entry in $find_links; do
    path="${entry#file://}"
    [[ $path == /* && -d $path ]] || continue
    mount_ro "$path"
    kept+=("$path")
  done
  BUILD_ARGS+=(--build-arg "PIP_FIND_LINKS=${kept[*]-}")

  kept=()
  for entry in $extra_index; do
    path="${entry#file://}"
    [[ $entry == file://* && -d $path ]] || continue
    # A "simple" index links its files relatively (../../files/x.whl): mount the folder above it.
    mount_ro "$(dirname "$path")"
    kept+=("$entry")
  done
  BUILD_ARGS+=(--build-arg "PIP_EXTRA_INDEX_URL=${kept[*]-}")

  kept=()
  for entry in $constraint; do
    [[ $entry == /* && -f $entry ]] || continue
    mount_ro "$entry"
    kept+=("$entry")
  done
  BUILD_ARGS+=(--build-arg "PIP_CONSTRAINT=${kept[*]-}")
}

ensure_base_image
add_local_pip_sources

# pip inside the build must trust what this host trusts (a TLS-inspecting proxy's CA, for one):
# the host's bundle, for the build only; the image keeps Debian's own.
HOST_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
[ -f "$HOST_CA_BUNDLE" ] && MOUNTS+=(-v "$HOST_CA_BUNDLE:$HOST_CA_BUNDLE:ro")

echo "building $IMGEMB_IMAGE_TAG from $REPO_ROOT/Dockerfile (storage: $IMGEMB_IMAGE_SCRATCH)"
for arg in "${BUILD_ARGS[@]}" "${MOUNTS[@]}"; do
  case $arg in --build-arg | -v) ;; *) echo "  $arg" ;; esac
done
started=$SECONDS
# --pull=never: the base comes from local storage only (no registry); --network=host: pip reaches
# PyPI through the host's network without a container network stack.
podman build --pull=never --network=host --layers \
  "${MOUNTS[@]}" "${BUILD_ARGS[@]}" "$@" \
  -f "$REPO_ROOT/Dockerfile" -t "$IMGEMB_IMAGE_TAG" "$REPO_ROOT"
build_s=$((SECONDS - started))

size_bytes="$(podman image inspect --format '{{.Size}}' "$IMGEMB_IMAGE_TAG")"
echo
echo "image:      $IMGEMB_IMAGE_TAG ($(podman image inspect --format '{{.Id}}' "$IMGEMB_IMAGE_TAG" | cut -c1-12))"
echo "build time: ${build_s} s for the Dockerfile, $((SECONDS - total_started)) s in all (base image and tool installs included)"
echo "image size: $(human_bytes "$size_bytes") ($size_bytes bytes, uncompressed)"
echo "storage:    $(du -shx "$IMGEMB_IMAGE_SCRATCH" | cut -f1) in $IMGEMB_IMAGE_SCRATCH"
