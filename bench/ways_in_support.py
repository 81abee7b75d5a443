"""Helpers of `bench.ways_in`: process groups, the corpus's expected rows, the embedding table's row count,
the webserver's GraphQL, and the instance's timeline (ticks, backfills, runs, steps)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import polars as pl

from imgemb_support.location import as_from_a_terminal

# Every process group started by a way; stopped at the end of the way, and again at exit.
_GROUPS: list[subprocess.Popen] = []


def start_group(command: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """A process in its own process group (so one signal reaches every child), output to `log`."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            as_from_a_terminal(list(command)),
            env=dict(env),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _GROUPS.append(process)
    return process


def group_members(pgid: int) -> list[str]:
    """Processes of the group still running (zombies excluded): pid and command line."""
    done = subprocess.run(["ps", "-eo", "pgid=,pid=,stat=,args="], capture_output=True, text=True, check=True)
    rows = [line.split(None, 3) for line in done.stdout.splitlines() if line.strip()]
    return [
        f"{row[1]} {row[3][:160]}"
        for row in rows
        if len(row) == 4 and row[0] == str(pgid) and not row[2].startswith("Z")
    ]


def stop_group(process: subprocess.Popen, grace_s: float = 60.0) -> list[str]:
    """SIGTERM to the group, then SIGKILL to whatever of it is left after `grace_s`; what had to be killed."""
    pgid = process.pid  # start_new_session: the leader's pid is the group id
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    # `dagster dev` may restart its code server while it shuts down: give the group a moment, then kill it.
    deadline = time.monotonic() + 10
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = group_members(pgid)
    if left:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    if process in _GROUPS:
        _GROUPS.remove(process)
    return left


def stop_all_groups() -> None:
    for process in list(reversed(_GROUPS)):
        stop_group(process, grace_s=30)


# --- the corpus ---------------------------------------------------------------------------------------------------

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def sales_ids(sales_dir: Path) -> set[str]:
    return set(pl.read_parquet(sorted(sales_dir.rglob("*.parquet"))).get_column("image_id").cast(pl.Utf8).to_list())


def decodable_ids(folder: Path, suffixes: Iterable[str] = _IMAGE_SUFFIXES) -> set[str]:
    """Image ids (file stems) under `folder` that Pillow opens and verifies."""
    from PIL import Image

    wanted = tuple(suffixes)
    ids = set()
    for path in folder.rglob("*"):
        if path.is_file() and path.name.endswith(wanted):
            try:
                with Image.open(path) as image:
                    image.verify()
            except Exception:  # a file the pipeline rejects
                continue
            ids.add(path.stem)
    return ids


# --- the table ----------------------------------------------------------------------------------------------------


def table_rows(uri: str) -> int:
    """Rows of the Delta table's current version (0 while it does not exist), from its add actions' stats."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        table = DeltaTable(uri)
    except TableNotFoundError:
        return 0
    except OSError:
        return 0
    try:
        import pyarrow as pa

        actions = pa.record_batch(table.get_add_actions(flatten=True))
        counts = actions.column("num_records").to_pylist()
        if counts and all(count is not None for count in counts):
            return int(sum(counts))
    except Exception:  # no stats: count the rows
        pass
    return int(pl.scan_delta(uri).select(pl.len()).collect().item())


# --- the webserver ------------------------------------------------------------------------------------------------


def graphql(port: int, query: str, variables: Mapping[str, object] | None = None) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": dict(variables or {})}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        body = json.loads(response.read())
    if body.get("errors"):
        raise RuntimeError(f"GraphQL errors: {body['errors']}")
    return body["data"]


ASSET_NODES_QUERY = "{ assetNodes { assetKey { path } isPartitioned isMaterializable } }"
PARTITION_KEYS_QUERY = """
query ($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { __typename
  ... on AssetNode { partitionKeysByDimension { name partitionKeys } } } }
"""
# What the UI's launch dialog sends (dagster-io/dagster js_modules, LAUNCH_PARTITION_BACKFILL_MUTATION).
LAUNCH_PARTITION_BACKFILL = """
mutation LaunchPartitionBackfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PartitionSetNotFoundError { message }
    ... on PythonError { message stack }
    ... on InvalidStepError { invalidStepKey }
    ... on UnauthorizedError { message }
  }
}
"""


# --- the timeline -------------------------------------------------------------------------------------------------


def _ts(value: object) -> float | None:
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return float(value.timestamp())  # a datetime
    return float(value)


def timeline(instance: object, t0: float) -> dict[str, list[dict[str, object]]]:
    """Every sensor tick, backfill and run of the instance, as seconds after t0 (negative: before it)."""
    from dagster import DagsterEventType

    def rel(value: object) -> float | None:
        stamp = _ts(value)
        return None if stamp is None else round(stamp - t0, 2)

    ticks = []
    for state in instance.all_instigator_state():
        for tick in instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1000):
            data = tick.tick_data
            added = sum(len(r.added_partitions or []) for r in (data.dynamic_partitions_request_results or []))
            ticks.append(
                {
                    "sensor": state.instigator_name,
                    "at": rel(tick.timestamp),
                    "end": rel(getattr(data, "end_timestamp", None)),
                    "status": tick.status.value,
                    "run_ids": list(tick.run_ids or []),
                    "partitions_added": added,
                    "skip_reason": (data.skip_reason or "")[:120] or None,
                    "error": (data.error.message[:200] if data.error else None),
                }
            )
    ticks.sort(key=lambda t: t["at"])
    backfills = [
        {
            "backfill_id": b.backfill_id,
            "created": rel(b.backfill_timestamp),
            "ended": rel(getattr(b, "backfill_end_timestamp", None)),
            "status": b.status.value,
            "tags": {k: v for k, v in (b.tags or {}).items()},
            "partitions": _num_partitions(b),
        }
        for b in instance.get_backfills()
    ]
    backfills.sort(key=lambda b: b["created"])
    kinds = {
        DagsterEventType.RUN_ENQUEUED: "queued",
        DagsterEventType.RUN_DEQUEUED: "dequeued",
        DagsterEventType.RUN_STARTING: "starting",
        DagsterEventType.RUN_START: "started",
        DagsterEventType.RUN_SUCCESS: "ended",
        DagsterEventType.RUN_FAILURE: "ended",
        DagsterEventType.RUN_CANCELED: "ended",
    }
    runs = []
    for record in instance.get_run_records():
        run = record.dagster_run
        events = {}
        for entry in instance.all_logs(run.run_id, of_type=set(kinds)):
            events.setdefault(kinds[entry.dagster_event_type], rel(entry.timestamp))
        steps = [
            {
                "step": s.step_key,
                "start": rel(s.start_time),
                "end": rel(s.end_time),
                "status": getattr(s.status, "value", None),
            }
            for s in instance.get_run_step_stats(run.run_id)
        ]
        tags = run.tags or {}
        runs.append(
            {
                "run_id": run.run_id[:8],
                "job": run.job_name,
                "status": run.status.value,
                "created": rel(record.create_timestamp),
                **events,
                "start_time": rel(record.start_time),
                "end_time": rel(record.end_time),
                "assets": sorted("/".join(k.path) for k in (run.asset_selection or [])),
                "partitions": (
                    f"{tags.get('dagster/asset_partition_range_start')}..{tags.get('dagster/asset_partition_range_end')}"
                    if "dagster/asset_partition_range_start" in tags
                    else tags.get("dagster/partition")
                ),
                "backfill": tags.get("dagster/backfill"),
                "by": _launched_by(tags),
                "steps": steps,
            }
        )
    runs.sort(key=lambda r: r["created"])
    return {"ticks": ticks, "backfills": backfills, "runs": runs, "materializations": _materializations(instance, rel)}


_TIMED_ASSETS = ("raw_images", "sales_export", "sales", "image_embeddings")


def _materializations(instance: object, rel: Callable[[object], float | None]) -> list[dict[str, object]]:
    """When each source report (raw_images, sales_export) and each sales / image_embeddings write landed."""
    from dagster import AssetKey, AssetRecordsFilter

    found = []
    for asset in _TIMED_ASSETS:
        try:
            records = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=AssetKey(asset)), limit=10000
            ).records
        except Exception:  # the timeline is a report: never fail the way for it
            continue
        for record in records:
            materialization = record.asset_materialization
            found.append(
                {
                    "asset": asset,
                    "partition": None if materialization is None else materialization.partition,
                    "at": rel(record.timestamp),
                    "run": (record.run_id or "")[:8] or None,
                }
            )
    return sorted(found, key=lambda m: m["at"])


def _num_partitions(backfill: object) -> int | None:
    try:
        return backfill.get_num_partitions()
    except Exception:  # an asset backfill may need its asset graph
        return None


def _launched_by(tags: Mapping[str, str]) -> str:
    parts = [f"backfill {tags['dagster/backfill']}"] if "dagster/backfill" in tags else []
    parts += [
        f"{key.split('/')[-1]}={tags[key]}"
        for key in ("dagster/sensor_name", "dagster/from_automation_condition")
        if key in tags
    ]
    return ", ".join(parts) or "its command (no backfill)"


def print_timeline(name: str, line: Mapping[str, list[dict[str, object]]], until: float | None = None) -> None:
    """The timeline, compactly: ticks that did something, backfills, runs with queue/start/end and their steps."""
    print(f"\n--- {name}: timeline (seconds after the first action) ---")
    events: list[tuple[float, str]] = []
    for tick in line["ticks"]:
        if until is not None and tick["at"] is not None and tick["at"] > until:
            continue
        # A tick that only reported events is SKIPPED ("empty result"), like one that found nothing: the
        # reports themselves are shown below, from the event log.
        did = tick["status"] != "SKIPPED" or tick["error"] or tick["partitions_added"]
        if not did:
            continue
        what = f"tick {tick['sensor']} {tick['status']} (ended {tick['end']})"
        if tick["partitions_added"]:
            what += f", {tick['partitions_added']} partitions added"
        if tick["run_ids"]:
            what += f", requested {len(tick['run_ids'])}: {', '.join(r[:8] for r in tick['run_ids'])}"
        if tick["error"]:
            what += f", error {tick['error']}"
        events.append((tick["at"], what))
    skipped: dict[str, int] = {}
    for tick in line["ticks"]:
        if (
            tick["status"] == "SKIPPED"
            and not tick["partitions_added"]
            and (until is None or (tick["at"] or 0) <= until)
        ):
            skipped[tick["sensor"]] = skipped.get(tick["sensor"], 0) + 1
    for backfill in line["backfills"]:
        origin = "automation" if backfill["tags"].get("dagster/from_automation_condition") else "a command or the UI"
        events.append(
            (backfill["created"], f"backfill {backfill['backfill_id']} created by {origin}, "
             f"status {backfill['status']}, ended {backfill['ended']}")
        )  # fmt: skip
    for run in line["runs"]:
        steps = ", ".join(f"{s['step']} {s['start']}..{s['end']}" for s in run["steps"] if s["start"] is not None)
        events.append(
            (
                run["created"],
                f"run {run['run_id']} {run['job']} [{run['partitions']}] by {run['by']}: queued {run.get('queued')}, "
                f"starting {run.get('starting')}, started {run.get('started')}, ended {run.get('ended')} {run['status']}; "
                f"steps: {steps}",
            )
        )
    groups: dict[tuple[object, object, object], list[str]] = {}
    for m in line.get("materializations", []):
        if until is None or (m["at"] or 0) <= until:
            # one line per asset and run (or per runless report within the same second)
            key = (m["asset"], m["run"], None if m["run"] else round(m["at"] or 0))
            groups.setdefault(key, []).append(f"{m['partition'] or ''}@{m['at']}")
    for (asset, run, _), items in groups.items():
        source = f"run {run}" if run else "reported by a sensor or command"
        first = float(items[0].rsplit("@", 1)[1])
        events.append((first, f"{asset} materialized ({source}), {len(items)}: {' '.join(items)}"))
    for at, what in sorted(events, key=lambda e: (e[0] is None, e[0] or 0)):
        print(f"  {at:>8}  {what}")
    if skipped:
        print(f"  (skipped ticks, not shown: {skipped})")
