#!/usr/bin/env bash
# Smoke test of the image deploy/image/build.sh built (`make image-smoke`): runs it and checks that
#   1. it runs as the non-root user (uid 10001);
#   2. `dagster definitions validate` passes inside it;
#   3. the libraries the shipped deploy configs name import (dagster_postgres, dagster_aws.ecs,
#      dagster_k8s, dagster_celery);
#   4. the shipped deploy/ecs/dagster.yaml, unmodified, loads as the instance config against a real
#      PostgreSQL server (PostgreSQL storage, EcsRunLauncher, QueuedRunCoordinator);
#   5. one partition of the generated sample data is materialized by the image's own `dagster`
#      CLI, on that PostgreSQL instance, and its embeddings are in the Delta lake;
#   6. the image's default command (the gRPC code server) starts and answers a health check.
#
# The checks run in one container with no network (--network=none: the image needs none at run time
# with random weights). PostgreSQL is Debian's server from this host, started as `postgres` inside the
# container's network namespace: the shipped config's fixed port 5432 is then free whatever else runs
# on the host, and nothing listens outside. Data lives in a scratch folder, removed at the end.
#
# Settings (environment): IMGEMB_IMAGE_SCRATCH, IMGEMB_IMAGE_TAG (as build.sh);
#   IMGEMB_SMOKE_IMAGES_PER_PREFIX (default 20), IMGEMB_SMOKE_PARTITION (default 2026-11-01).
set -euo pipefail
# shellcheck source=deploy/image/common.sh
source "$(dirname "$0")/common.sh"

require_root
ensure_podman

IMAGES_PER_PREFIX="${IMGEMB_SMOKE_IMAGES_PER_PREFIX:-20}"
PARTITION="${IMGEMB_SMOKE_PARTITION:-2026-11-01}"
IMAGE_UID=10001

if ! podman image exists "$IMGEMB_IMAGE_TAG"; then
  echo "no $IMGEMB_IMAGE_TAG in $IMGEMB_IMAGE_SCRATCH: run deploy/image/build.sh (make image) first" >&2
  exit 2
fi

# Debian's server binaries, per major version, off PATH (as .ci/run and the tests use them).
ensure_debian_commands pg_ctlcluster:postgresql
PG_BIN="$(dirname "$(printf '%s\n' /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)")"
[ -x "$PG_BIN/initdb" ] || { echo "no PostgreSQL server binaries under /usr/lib/postgresql" >&2; exit 2; }

started=$SECONDS
WORK="$(mktemp -d "$IMGEMB_IMAGE_SCRATCH/smoke.XXXXXX")"
chmod 755 "$WORK" # the postgres user must reach its cluster below it
CONTAINER="imgemb-smoke-$$"
CODE_SERVER="imgemb-smoke-grpc-$$"
PG_DIR="$WORK/pg"
pg_started=0

as_postgres() {
  # PostgreSQL refuses to run as root; a clean environment keeps root's settings out of the server.
  env -i PATH=/usr/bin:/bin LC_ALL=C setpriv --reuid postgres --regid postgres --clear-groups -- "$@"
}

cleanup() {
  local status=$?
  if [ "$pg_started" = 1 ]; then
    as_postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w -t 60 stop >/dev/null || true
  fi
  # One at a time, the code server first: it shares the other's network namespace, and podman
  # refuses to remove a container that another still depends on.
  podman rm -f -t 0 "$CODE_SERVER" >/dev/null 2>&1 || true
  podman rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
  if podman container exists "$CONTAINER"; then
    echo "warning: could not remove container $CONTAINER" >&2
  fi
  if [ "$status" -ne 0 ] && [ -f "$PG_DIR/server.log" ]; then
    echo "--- PostgreSQL log (last lines) ---" >&2
    tail -n 20 "$PG_DIR/server.log" >&2
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT

step_started=$SECONDS
step() {
  echo "== $* (+$((SECONDS - started)) s)"
  step_started=$SECONDS
}
step_done() {
  echo "   ok ($((SECONDS - step_started)) s)"
}

# The data folder belongs to the image's user, as a volume would on a real deployment.
mkdir -p "$WORK/data/home"
# The shipped ECS instance config, byte for byte.
cp "$REPO_ROOT/deploy/ecs/dagster.yaml" "$WORK/data/home/dagster.yaml"
chown -R "$IMAGE_UID:$IMAGE_UID" "$WORK/data"

step "start the container ($IMGEMB_IMAGE_TAG, --network=none)"
# IMGEMB_MODEL_WEIGHTS=random: no network to download torchvision's weights; the rows say so in model_id.
# AWS_DEFAULT_REGION: EcsRunLauncher builds its boto3 clients when the instance loads (no AWS call
# is made), and botocore takes a client's region from AWS_DEFAULT_REGION, not AWS_REGION; ECS tasks
# get both from the agent.
podman run -d --name "$CONTAINER" --network=none \
  -v "$WORK/data:/data" -v "$IMAGE_DIR:/smoke:ro" \
  -e DAGSTER_HOME=/data/home \
  -e DAGSTER_PG_HOST=127.0.0.1 -e DAGSTER_PG_USERNAME=postgres \
  -e DAGSTER_PG_PASSWORD=unused-trust-auth -e DAGSTER_PG_DB=imgemb \
  -e AWS_REGION=us-east-1 -e AWS_DEFAULT_REGION=us-east-1 \
  -e IMGEMB_RAW_IMAGES_URI=/data/sample/raw-images -e IMGEMB_SALES_URI=/data/sample/sales-data \
  -e IMGEMB_LAKE_URI=/data/lake -e IMGEMB_MODEL_WEIGHTS=random \
  "$IMGEMB_IMAGE_TAG" sleep infinity >/dev/null
in_container() { podman exec "$CONTAINER" "$@"; }
# logged NAME LINES CMD...: CMD's output goes to a log; its last LINES lines are shown, 40 on failure.
logged() {
  local log="$WORK/$1.log" lines=$2
  shift 2
  if ! "$@" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "failed: $*" >&2
    return 1
  fi
  # Dagster colours its log lines: drop the escape codes from what is shown.
  [ "$lines" -gt 0 ] && tail -n "$lines" "$log" | sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^/   /' | cut -c1-200
  return 0
}
step_done

step "1. runs as non-root"
configured_user="$(podman image inspect --format '{{.Config.User}}' "$IMGEMB_IMAGE_TAG")"
uid="$(in_container id -u)"
echo "   image USER=$configured_user, id -u in the container: $uid ($(in_container id -un))"
[ "$uid" = "$IMAGE_UID" ] || { echo "expected uid $IMAGE_UID" >&2; exit 1; }
step_done

step "start PostgreSQL $(basename "$(dirname "$PG_BIN")") in the container's network namespace (127.0.0.1:5432)"
mkdir -p "$PG_DIR"
chown postgres: "$PG_DIR"
logged initdb 0 as_postgres "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --no-sync
container_pid="$(podman inspect --format '{{.State.Pid}}' "$CONTAINER")"
# fsync=off: a throwaway cluster. -k: its socket in our own folder, not /run/postgresql.
nsenter --target "$container_pid" --net -- env -i PATH=/usr/bin:/bin LC_ALL=C \
  setpriv --reuid postgres --regid postgres --clear-groups -- \
  "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p 5432 -k $PG_DIR -c fsync=off" start >/dev/null
pg_started=1
as_postgres "$PG_BIN/createdb" -h "$PG_DIR" -p 5432 -U postgres imgemb
step_done

step "2. dagster definitions validate"
logged validate 2 in_container dagster definitions validate -m imgemb_assets.definitions
step_done

step "3. deploy-config libraries import"
in_container python /smoke/smoke_checks.py imports
step_done

step "4. deploy/ecs/dagster.yaml loads as the instance (PostgreSQL storage)"
in_container python /smoke/smoke_checks.py instance
step_done

step "5. materialize partition $PARTITION on the sample data ($IMAGES_PER_PREFIX images per prefix)"
in_container python /smoke/smoke_checks.py dataset /data/sample "$IMAGES_PER_PREFIX"
# Registers the prefixes as partitions in the PostgreSQL instance (no `dagster` command does).
logged discover 3 in_container imgemb discover
materialize_started=$SECONDS
logged materialize 0 \
  in_container dagster asset materialize -m imgemb_assets.definitions --select '*' --partition "$PARTITION"
echo "   dagster asset materialize: $((SECONDS - materialize_started)) s"
grep -E 'RUN_SUCCESS|RUN_FAILURE' "$WORK/materialize.log" | tail -n 1 | cut -c1-160 | sed 's/^/   /' || true
in_container python /smoke/smoke_checks.py verify /data/sample "$IMAGES_PER_PREFIX" "$PARTITION"
step_done

step "6. the image's default command serves gRPC"
# The image's own CMD, unchanged, in the same network namespace so the check can reach it.
podman run -d --name "$CODE_SERVER" --network="container:$CONTAINER" "$IMGEMB_IMAGE_TAG" >/dev/null
for _ in $(seq 1 120); do
  if in_container dagster api grpc-health-check -p 4000 -h 127.0.0.1 >/dev/null 2>&1; then
    healthy=1
    break
  fi
  sleep 1
done
if [ "${healthy:-0}" != 1 ]; then
  podman logs --tail 30 "$CODE_SERVER" >&2
  echo "the code server did not answer on port 4000" >&2
  exit 1
fi
echo "   health check SERVING as uid $(podman exec "$CODE_SERVER" id -u)"
step_done

echo
echo "smoke test passed in $((SECONDS - started)) s ($IMGEMB_IMAGE_TAG)"
