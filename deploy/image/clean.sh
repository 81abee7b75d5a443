#!/usr/bin/env bash
# Removes everything build.sh and smoke_test.sh left (`make image-clean`): podman's storage, base
# images included, several GB. The next `make image` bootstraps the base again (minutes).
set -euo pipefail
# shellcheck source=deploy/image/common.sh
source "$(dirname "$0")/common.sh"

require_root
[ -d "$IMGEMB_IMAGE_SCRATCH" ] || { echo "nothing to remove: no $IMGEMB_IMAGE_SCRATCH"; exit 0; }
# Containers first (their layers are mounted), then whatever mounts the overlay driver keeps under
# the storage (it bind-mounts its own folder), deepest first; a plain rm -rf would trip over them.
if type -P podman >/dev/null && [ -d "$IMGEMB_IMAGE_SCRATCH/storage" ]; then
  podman rm --all --force >/dev/null 2>&1 || true
fi
findmnt -rn -o TARGET | { grep -F "$IMGEMB_IMAGE_SCRATCH/" || true; } | sort -r | while read -r target; do
  umount "$target" || umount -l "$target"
done
echo "removing $IMGEMB_IMAGE_SCRATCH ($(du -sh "$IMGEMB_IMAGE_SCRATCH" 2>/dev/null | cut -f1))"
rm -rf "$IMGEMB_IMAGE_SCRATCH"
