# shellcheck shell=bash
# Shared by build.sh and smoke_test.sh (sourced, not run): where podman keeps its state, and how it
# is called. Everything podman writes goes under one scratch folder, outside the repository, so a
# build can be thrown away with one `rm -rf` (make image-clean) and never touches /var/lib/containers.

# Several GB after a build: keep it off the repository (and out of the build context).
IMGEMB_IMAGE_SCRATCH="${IMGEMB_IMAGE_SCRATCH:-/var/tmp/imgemb-image}"
IMGEMB_IMAGE_TAG="${IMGEMB_IMAGE_TAG:-imgemb:latest}"
# The name the Dockerfile's FROM resolves to; build.sh provides a stand-in when no registry is reachable.
IMGEMB_BASE_IMAGE="${IMGEMB_BASE_IMAGE:-docker.io/library/python:3.11-slim}"

IMAGE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$IMAGE_DIR/../.." && pwd)"

case "$IMGEMB_IMAGE_SCRATCH" in
  "$REPO_ROOT"|"$REPO_ROOT"/*)
    echo "IMGEMB_IMAGE_SCRATCH=$IMGEMB_IMAGE_SCRATCH is inside the repository: it would enter the build context" >&2
    exit 2 ;;
esac

# Our engine settings (runc, ulimits, no systemd), not the host's.
export CONTAINERS_CONF="$IMAGE_DIR/containers.conf"
# buildah and podman import stage layers in TMPDIR: keep those GBs in the scratch folder too.
export TMPDIR="$IMGEMB_IMAGE_SCRATCH/tmp"

podman() {
  command podman \
    --root "$IMGEMB_IMAGE_SCRATCH/storage" \
    --runroot "$IMGEMB_IMAGE_SCRATCH/run" \
    --tmpdir "$IMGEMB_IMAGE_SCRATCH/libpod" \
    --storage-driver overlay \
    "$@"
}

require_root() {
  # Rootless podman needs subuid ranges and user namespaces set up per user; these scripts use
  # root podman, as the machines they were written on run everything as root.
  if [ "$(id -u)" -ne 0 ]; then
    echo "$(basename "$0"): run as root (root podman; storage under $IMGEMB_IMAGE_SCRATCH)" >&2
    exit 2
  fi
}

# Installs Debian packages whose command is missing: "command:package" pairs.
ensure_debian_commands() {
  local missing=() pair
  for pair in "$@"; do
    # type -P: a program on PATH, not the podman() wrapper defined above.
    type -P "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "missing ${missing[*]} and no apt-get to install them" >&2
    exit 2
  fi
  echo "installing from Debian: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_podman() {
  # podman's own recommends pull in crun and a CNI stack we do not use; runc is what works here.
  ensure_debian_commands podman:podman runc:runc
  mkdir -p "$IMGEMB_IMAGE_SCRATCH" "$TMPDIR"
}

human_bytes() {
  numfmt --to=iec-i --suffix=B --format='%.2f' "$1"
}
