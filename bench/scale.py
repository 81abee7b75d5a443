"""How the instance, the lake and the UI behave at many prefixes (dynamic partitions), on SQLite and PostgreSQL.

    python -m bench.scale [--prefixes 10000] [--share 0.2] [--storage sqlite|postgres|both]
                          [--work-dir DIR] [--repeat 3] [--json PATH] [--automation] [--profile DIR]
    python -m bench.scale --s3 --prefixes 2000 ...   the root and sales export on a moto S3 server

Builds (once, cached under --work-dir; see `bench/scale_support.py`) a local
root of N date prefixes with 1-3 tiny JPEGs each, 100 more kept aside, and a
sales export; then a lake with the oldest `share` of the prefixes written
through the project's own code paths, one Delta commit per partition per table
(embeddings are random float32 vectors of width 2048 in the asset's schema, not
ResNet50's: the log and the files do not depend on the values). Then, for each
instance storage, on a fresh instance (the shipped dagster.yaml; PostgreSQL is a
fresh server from Debian's binaries): `imgemb discover` registers every prefix,
the events the sensors and assets would have stored are reported (runless
materializations: no run is executed), and it times, in this process unless
said otherwise, each repeated where cheap (best and median):

- `imgemb discover` (a process of its own, imports included), first and again;
- a discovery sensor tick with nothing new, and with 100 new prefixes (the
  sensor's evaluation, then what the daemon stores after it: events, partitions,
  the tick row and the sensor state, both holding the cursor);
- planning the missing-partition backfill (`plan_backfill`, and
  `imgemb backfill-missing --dry-run` as a process), and `imgemb status`;
- one tick of `full_reconciliation_sensor`, and its full cycle over every
  prefix (run for real within --cycle-budget-s, else ticks x median tick);
- `Lake.read` of one partition of each table;
- the asset page's partition status over the UI's GraphQL API
  (`dagster-webserver` on the code location; one warm-up, then timed);
- with --automation, two ticks of the automation sensor as the asset daemon
  evaluates them (`AutomationTickEvaluationContext`: from an empty cursor, then
  from the one it returned), in a process of their own with a timeout.

With --s3, the raw-images root and the sales export are uploaded to a moto S3
server on 127.0.0.1 (the lake stays local), so discovery, reconciliation and
the commands list over HTTP; use fewer prefixes there (e.g. --prefixes 2000).

Also reported: each table's Delta log (bytes, files) and data files, the
discovery cursor's size and the tick rows that hold it. Prints a markdown table;
--json writes everything. Times are wall seconds on whatever else the machine
runs at the same time. With --profile DIR, the repeatable operations run once
more under cProfile (the commands as `python -m cProfile -m imgemb_assets.cli`,
the automation evaluations as `python -m cProfile -m bench.scale`):
DIR/<storage>-<operation>.prof, and a .txt of the top functions by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.scale_support import (
    BIN,
    PARTITION_HEALTH_QUERY,
    PARTITION_STATS_QUERY,
    Corpus,
    LakeState,
    build_corpus,
    build_lake,
    code_location_env,
    corpus_on_s3,
    environment,
    graphql,
    instance_home,
    new_prefixes_in_root,
    partition_counts,
    record_state,
    run_timed,
    running_webserver,
    sensor_origin,
    store_sensor_state,
    table_footprints,
    write_tick_as_daemon,
)

STORAGES = ("sqlite", "postgres")
_CLI_TIMEOUT_S = 600


@dataclass
class Measure:
    storage: str  # sqlite, postgres, or `lake` / `root` when no instance is involved
    operation: str
    seconds: list[float]
    note: str = ""

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


@dataclass
class Report:
    params: dict[str, Any]
    setup: dict[str, Any] = field(default_factory=dict)
    measures: list[Measure] = field(default_factory=list)

    def add(self, storage: str, operation: str, seconds: Sequence[float], note: str = "") -> Measure:
        measure = Measure(storage, operation, [round(s, 4) for s in seconds], note)
        self.measures.append(measure)
        print(f"  {storage:8s} {operation}: best {measure.best:.3f} s, median {measure.median:.3f} s "
              f"({len(seconds)}x) {note}", flush=True)  # fmt: skip
        return measure


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def repeated(function: Callable[[], Any], times: int) -> tuple[list[float], Any]:
    """Seconds of each of `times` calls, and the last call's result."""
    seconds, result = [], None
    for _ in range(times):
        elapsed, result = timed(function)
        seconds.append(elapsed)
    return seconds, result


@dataclass(frozen=True)
class Profiler:
    """One more call of an operation under cProfile, when a directory is given; never timed."""

    directory: Path | None

    def call(self, name: str, function: Callable[[], Any]) -> None:
        if self.directory is None:
            return
        profile = cProfile.Profile()
        profile.runcall(function)
        self._save(name, profile)

    def command(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str],
        module: str = "imgemb_assets.cli",
        timeout_s: float = 600,
    ) -> None:
        """`python -m MODULE ARGS` (by default `imgemb ARGS`) under cProfile, in a process of its own."""
        if self.directory is None:
            return
        path = self._path(name, ".prof")
        run_timed([sys.executable, "-m", "cProfile", "-o", str(path), "-m", module, *args], env, timeout_s)
        self._summarize(pstats.Stats(str(path)), name)

    def _save(self, name: str, profile: cProfile.Profile) -> None:
        profile.dump_stats(str(self._path(name, ".prof")))
        self._summarize(pstats.Stats(profile), name)

    def _summarize(self, stats: pstats.Stats, name: str) -> None:
        out = io.StringIO()
        stats.stream = out  # type: ignore[attr-defined]
        stats.sort_stats("cumulative").print_stats(40)
        self._path(name, ".txt").write_text(out.getvalue())

    def _path(self, name: str, suffix: str) -> Path:
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory / (re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") + suffix)


# ---------------------------------------------------------------------------- measures without an instance


def measure_lake(report: Report, lake: LakeState, repeat: int) -> None:
    from imgemb_assets.core.lake import tables
    from imgemb_assets.core.lake.lake import Lake

    prefix = lake.written[len(lake.written) // 2].prefix
    for name in tables.ALL_TABLES:
        partition = None if name == tables.SALES else prefix
        # A new Lake each time: every read opens the table's log afresh, as a step does.
        seconds, table = repeated(lambda: Lake(lake.uri).read(name, partition), repeat)
        report.add("lake", f"Lake.read {name}" + ("" if partition is None else " (one partition)"),
                   seconds, f"{table.num_rows} rows")  # fmt: skip
    footprints = table_footprints(lake.uri)
    report.setup["tables"] = [asdict(footprint) for footprint in footprints]


def full_fingerprints(report: Report, corpus: Corpus) -> str:
    """Every prefix fingerprinted (what the sensor's cursor holds once all are known); the cursor."""
    from imgemb_assets.core.ingest.discovery import DiscoveryCursor, plan_discovery
    from imgemb_assets.core.storage.open_store import open_object_store
    from imgemb_assets.core.storage.s3 import S3Settings
    from imgemb_assets.dagster_wiring.ingest.discovery_sensor import DEFAULT_RECENT_PREFIXES

    store = open_object_store(corpus.raw_images_uri, S3Settings())
    seconds, plan = timed(lambda: plan_discovery(store, DiscoveryCursor(), DEFAULT_RECENT_PREFIXES, full=True))
    where = "root+s3" if corpus.raw_images_uri.startswith("s3://") else "root"
    report.add(where, "plan_discovery(full=True): list + fingerprint every prefix", [seconds],
               f"{len(plan.cursor.fingerprints)} prefixes")  # fmt: skip
    seconds, listing = repeated(store.list_partition_folders, 3)
    report.add(where, "list the root's prefix folders", seconds, f"{len(listing.prefixes)} prefixes")
    return plan.cursor.to_json()


# ---------------------------------------------------------------------------- measures on an instance


@dataclass(frozen=True)
class Setting:
    """What the measures of one instance share."""

    storage: str
    corpus: Corpus
    lake: LakeState
    env: dict[str, str]
    cursor: str  # the discovery sensor's cursor once every prefix is known
    repeat: int
    work_dir: Path
    profiler: Profiler
    label: str  # the storage, and `+s3` when the root is on the moto server


def measure_instance(report: Report, setting: Setting, cycle_budget_s: float, automation: bool) -> None:
    from dagster import DagsterInstance

    from imgemb_assets.core.ingest.discovery import DiscoveryCursor

    storage, env = setting.label, setting.env
    imgemb = str(BIN / "imgemb")
    seconds, output = run_timed([imgemb, "discover"], env, _CLI_TIMEOUT_S)
    report.add(storage, "`imgemb discover`, first (registers every prefix)", [seconds], output.split(";")[0])
    with DagsterInstance.get() as instance:
        fingerprints = DiscoveryCursor.from_json(setting.cursor).fingerprints
        seconds, events = timed(lambda: record_state(instance, setting.corpus, setting.lake, fingerprints, log=_log))
        report.setup[f"{storage}_events_recorded"] = events
        report.setup[f"{storage}_record_events_s"] = round(seconds, 1)
        origin = sensor_origin("raw_prefix_sensor")
        store_sensor_state(instance, origin, setting.cursor)
        _log(f"instance: {events} events recorded in {seconds:.0f} s")
        measures: list[tuple[str, Callable[[], None]]] = [
            ("imgemb discover", lambda: measure_discover_again(report, setting)),
            ("discovery tick", lambda: measure_discovery_tick(report, setting, instance, origin)),
            ("backfill plan", lambda: measure_backfill_plan(report, setting, instance)),
            ("reconciliation", lambda: measure_reconciliation(report, setting, instance, cycle_budget_s)),
            ("GraphQL", lambda: measure_graphql(report, setting)),
            *([("automation", lambda: measure_automation(report, setting))] if automation else []),
            # Last: it registers the new prefixes.
            ("discovery tick, new prefixes", lambda: measure_new_prefixes_tick(report, setting, instance, origin)),
        ]
        for name, measure in measures:
            try:
                measure()
            except Exception as exc:  # one broken measure must not cost the others their results
                report.add(storage, f"{name}: FAILED", [0.0], f"{type(exc).__name__}: {exc}"[:300].replace("\n", " "))
        report.setup[f"{storage}_tick_rows"] = tick_rows(setting)


def measure_discover_again(report: Report, setting: Setting) -> None:
    command = [str(BIN / "imgemb"), "discover"]
    seconds = [run_timed(command, setting.env, _CLI_TIMEOUT_S)[0] for _ in range(setting.repeat)]
    report.add(setting.label, "`imgemb discover`, again (nothing new)", seconds)
    setting.profiler.command(f"{setting.label} imgemb discover", ["discover"], setting.env)


def _storage_resource(setting: Setting) -> Any:
    from imgemb_assets.dagster_wiring.location.resources import ImgembS3Resource, StorageResource

    return StorageResource(
        raw_images_uri=setting.corpus.raw_images_uri,
        sales_uri=setting.corpus.sales_uri,
        lake_uri=setting.lake.uri,
        s3=ImgembS3Resource(),
    )


def _evaluate(sensor: Any, instance: Any, cursor: str | None, storage: Any) -> Any:
    from dagster import build_sensor_context

    with build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage}) as context:
        return sensor(context)


def _location_sensor(name: str) -> Any:
    """The sensor as the code location defines it, with the settings in the environment."""
    from imgemb_assets.dagster_wiring.location.settings import LocationSettings
    from imgemb_assets.definitions import build_definitions

    return build_definitions(LocationSettings.from_environ(os.environ)).resolve_sensor_def(name)


def _discovery_sensor() -> Any:
    return _location_sensor("raw_prefix_sensor")


def measure_discovery_tick(report: Report, setting: Setting, instance: Any, origin: Any) -> None:
    sensor, storage = _discovery_sensor(), _storage_resource(setting)
    seconds, result = repeated(lambda: _evaluate(sensor, instance, setting.cursor, storage), setting.repeat + 2)
    if result.asset_events or result.dynamic_partitions_requests:
        raise RuntimeError(f"a tick with nothing new reported {len(result.asset_events)} events")
    report.add(setting.label, "discovery tick, nothing new: sensor evaluation", seconds,
               f"cursor {len(result.cursor.encode()) / 1e6:.2f} MB")  # fmt: skip
    setting.profiler.call(f"{setting.label} discovery tick nothing new",
                          lambda: _evaluate(sensor, instance, setting.cursor, storage))  # fmt: skip
    seconds, _ = repeated(lambda: write_tick_as_daemon(instance, origin, result.cursor, [], []), setting.repeat)
    report.add(
        setting.label, "discovery tick, nothing new: daemon's writes (tick row + state, cursor in both)", seconds
    )


def measure_new_prefixes_tick(report: Report, setting: Setting, instance: Any, origin: Any) -> None:
    sensor, storage = _discovery_sensor(), _storage_resource(setting)
    with new_prefixes_in_root(setting.corpus):
        seconds, result = repeated(lambda: _evaluate(sensor, instance, setting.cursor, storage), setting.repeat)
        (added,) = result.dynamic_partitions_requests
        report.add(setting.label, f"discovery tick, {len(setting.corpus.new_prefixes)} new prefixes: sensor evaluation",
                   seconds, f"{len(added.partition_keys)} registered, {len(result.asset_events)} raw_images events")  # fmt: skip
        setting.profiler.call(f"{setting.label} discovery tick 100 new",
                              lambda: _evaluate(sensor, instance, setting.cursor, storage))  # fmt: skip
        # Once: it registers the prefixes (the evaluations above changed nothing).
        seconds, _ = timed(
            lambda: write_tick_as_daemon(instance, origin, result.cursor, added.partition_keys, result.asset_events)
        )
        report.add(setting.label, f"discovery tick, {len(setting.corpus.new_prefixes)} new prefixes: daemon's writes",
                   [seconds], "events one by one, partitions, tick row, state")  # fmt: skip


def measure_backfill_plan(report: Report, setting: Setting, instance: Any) -> None:
    from imgemb_assets.core.lake import tables
    from imgemb_assets.core.storage.open_store import open_object_store
    from imgemb_assets.core.storage.s3 import S3Settings
    from imgemb_assets.dagster_wiring.backfills import plan_backfill

    sales_store = open_object_store(setting.corpus.sales_uri, S3Settings())
    seconds, plan = repeated(lambda: plan_backfill(instance, tables.IMAGE_EMBEDDINGS, sales_store), setting.repeat)
    expected = len(setting.corpus.prefixes) - len(setting.lake.written)
    if len(plan.tables_by_prefix) != expected or plan.refresh_sales:
        raise RuntimeError(f"the plan holds {len(plan.tables_by_prefix)} prefixes, expected {expected}")
    report.add(
        setting.label, "plan_backfill(image_embeddings)", seconds, f"{len(plan.tables_by_prefix)} prefixes to run"
    )
    setting.profiler.call(f"{setting.label} plan_backfill",
                          lambda: plan_backfill(instance, tables.IMAGE_EMBEDDINGS, sales_store))  # fmt: skip
    imgemb = str(BIN / "imgemb")
    command = [imgemb, "backfill-missing", "--asset", tables.IMAGE_EMBEDDINGS, "--dry-run"]
    seconds = [run_timed(command, setting.env, _CLI_TIMEOUT_S)[0] for _ in range(setting.repeat)]
    report.add(setting.label, "`imgemb backfill-missing --dry-run`", seconds, "process: imports, discover (dry), plan")
    setting.profiler.command(f"{setting.label} imgemb backfill-missing dry-run", command[1:], setting.env)
    seconds, output = timed(lambda: run_timed([imgemb, "status"], setting.env, _CLI_TIMEOUT_S)[1])
    summary = [line for line in output.splitlines() if line.startswith(tables.IMAGE_EMBEDDINGS)]
    report.add(setting.label, "`imgemb status`", [seconds], summary[0] if summary else "")


def measure_reconciliation(report: Report, setting: Setting, instance: Any, budget_s: float) -> None:
    from imgemb_assets.dagster_wiring.location.settings import LocationSettings
    from imgemb_assets.dagster_wiring.names import RECONCILIATION_SENSOR_NAME

    settings = LocationSettings.from_environ(os.environ)
    per_tick = settings.reconciliation_prefixes_per_tick
    sensor = _location_sensor(RECONCILIATION_SENSOR_NAME)
    storage = _storage_resource(setting)
    registered = len(setting.corpus.prefixes)
    ticks_per_cycle = math.ceil(registered / per_tick)
    cursor: str | None = None
    seconds: list[float] = []
    reported = 0
    started = time.perf_counter()
    # The ticks of one cycle, in turn, until the cycle ends or the budget is spent (at least 3).
    while len(seconds) < ticks_per_cycle and (len(seconds) < 3 or time.perf_counter() - started < budget_s):
        elapsed, result = timed(lambda: _evaluate(sensor, instance, cursor, storage))
        seconds.append(elapsed)
        cursor, reported = result.cursor, reported + len(result.asset_events)
    report.add(setting.label, f"full_reconciliation_sensor tick ({per_tick} prefixes)", seconds,
               f"{reported} changed prefixes reported")  # fmt: skip
    setting.profiler.call(f"{setting.label} reconciliation tick", lambda: _evaluate(sensor, instance, None, storage))
    if len(seconds) == ticks_per_cycle:
        cycle, how = sum(seconds), "measured"
    else:
        cycle, how = ticks_per_cycle * statistics.median(seconds), f"estimated from {len(seconds)} ticks"
    report.add(setting.label, f"full_reconciliation_sensor full cycle ({ticks_per_cycle} ticks)", [cycle],
               f"{how}; one cycle every {ticks_per_cycle * settings.reconciliation_interval_s / 60:.0f} min")  # fmt: skip


def measure_graphql(report: Report, setting: Setting) -> None:
    from imgemb_assets.core.lake import tables
    from imgemb_assets.dagster_wiring.names import RAW_IMAGES

    log = setting.work_dir / f"webserver-{setting.label}.log"
    with running_webserver(setting.env, log) as server:
        report.add(setting.label, "dagster-webserver start until the location answers", [server.seconds_to_ready])
        for asset in (tables.IMAGE_EMBEDDINGS, RAW_IMAGES):
            variables = {"assetKey": {"path": [asset]}}
            cold, answer = timed(lambda: graphql(server.url, PARTITION_HEALTH_QUERY, variables))
            report.add(setting.label, f"GraphQL PartitionHealthQuery {asset}, first", [cold], partition_counts(answer))
            seconds, _ = repeated(lambda: graphql(server.url, PARTITION_HEALTH_QUERY, variables), setting.repeat)
            report.add(setting.label, f"GraphQL PartitionHealthQuery {asset}, warm", seconds)
            seconds, answer = repeated(lambda: graphql(server.url, PARTITION_STATS_QUERY, variables), setting.repeat)
            stats = answer["data"]["assetNodeOrError"]["partitionStats"]
            report.add(setting.label, f"GraphQL partitionStats {asset}", seconds,
                       f"{stats['numMaterialized']}/{stats['numPartitions']} materialized")  # fmt: skip


def measure_automation(report: Report, setting: Setting, timeout_s: float = 900) -> None:
    """Two ticks of the automation sensor, in a process of their own (they may take minutes)."""
    command = [sys.executable, "-m", "bench.scale", "--evaluate-automation"]
    try:
        seconds, output = run_timed(command, setting.env, timeout_s)
    except Exception as exc:  # a timeout is a result here, not a failure of the benchmark
        report.add(setting.label, "automation ticks (process)", [timeout_s], f"not done: {exc}"[:120])
        return
    for line in output.strip().splitlines()[-2:]:
        tick, _, rest = line.partition(" tick: ")
        evaluate_s = float(rest.split("evaluate ")[1].split(" s")[0])
        report.add(setting.label, f"automation sensor tick ({tick}): evaluation", [evaluate_s], rest)
    setting.profiler.command(f"{setting.label} automation evaluations", ["--evaluate-automation"], setting.env,
                             module="bench.scale", timeout_s=timeout_s)  # fmt: skip


def evaluate_automation_once() -> None:
    """`--evaluate-automation`: two ticks of the automation sensor, as the asset daemon evaluates them.

    `AutomationTickEvaluationContext.evaluate` from an empty cursor, then from
    the cursor it returned, each followed by the write of its evaluations (as
    `dagster/_daemon/asset_daemon.py` does; submitting the backfill is not
    timed). Dagster's test helper `evaluate_automation_conditions` is not used:
    it builds the new cursor outside the evaluator's cached partition loading,
    and reloads the 10,000 dynamic partitions ~600 times per evaluation.
    """
    import logging

    from dagster import DagsterInstance
    from dagster._core.definitions.asset_daemon_cursor import AssetDaemonCursor
    from dagster._core.definitions.automation_tick_evaluation_context import AutomationTickEvaluationContext
    from dagster._core.definitions.partitions.context import partition_loading_context
    from dagster._core.instance.types import CachingDynamicPartitionsLoader
    from dagster._time import get_current_datetime

    from imgemb_assets.dagster_wiring.location.settings import LocationSettings
    from imgemb_assets.dagster_wiring.names import AUTOMATION_SENSOR_NAME
    from imgemb_assets.definitions import build_definitions

    defs = build_definitions(LocationSettings.from_environ(os.environ))
    sensor = defs.resolve_sensor_def(AUTOMATION_SENSOR_NAME)
    graph = defs.resolve_asset_graph()
    cursor = AssetDaemonCursor.empty()
    with DagsterInstance.get() as instance:
        for tick in ("first", "next"):
            evaluation_id = cursor.evaluation_id + 1
            context = AutomationTickEvaluationContext(
                evaluation_id=evaluation_id,
                instance=instance,
                asset_graph=graph,
                cursor=cursor,
                materialize_run_tags={},
                observe_run_tags={},
                auto_observe_asset_keys=set(),
                asset_selection=sensor.asset_selection,
                logger=logging.getLogger("bench.scale"),
                emit_backfills=sensor.emit_backfills,
            )
            seconds, (requests, cursor, evaluations) = timed(context.evaluate)
            # Sizes of partition subsets need the partitions: loaded once, as the daemon's queryer does.
            with partition_loading_context(get_current_datetime(), CachingDynamicPartitionsLoader(instance)):
                records = [evaluation.with_run_ids(set()) for evaluation in evaluations]
                stored_s, _ = timed(
                    lambda: instance.schedule_storage.add_auto_materialize_asset_evaluations(evaluation_id, records)
                )
                requested = sum(record.num_requested for record in records)
            print(f"{tick} tick: evaluate {seconds:.2f} s, store evaluations {stored_s:.2f} s; "
                  f"{requested} asset partitions requested in {len(requests)} requests", flush=True)  # fmt: skip


def tick_rows(setting: Setting) -> dict[str, Any]:
    """How many tick rows the instance holds and their mean body size (the cursor is in each)."""
    sql = "SELECT count(*), avg(length(tick_body)) FROM job_ticks"
    if setting.storage == "sqlite":
        import sqlite3

        connection = sqlite3.connect(Path(setting.env["DAGSTER_HOME"]) / "schedules" / "schedules.db")
        count, mean = connection.execute(sql).fetchone()
        connection.close()
    else:
        import psycopg2

        connection = psycopg2.connect(setting.env["DAGSTER_PG_URL"])
        with connection.cursor() as cursor:
            cursor.execute(sql)
            count, mean = cursor.fetchone()
        connection.close()
    return {"ticks": count, "mean_tick_body_bytes": round(float(mean or 0))}


# ---------------------------------------------------------------------------- output


def markdown(report: Report) -> str:
    lines = ["| storage | operation | n | best s | median s | note |", "| --- | --- | --- | --- | --- | --- |"]
    for m in report.measures:
        lines.append(f"| {m.storage} | {m.operation} | {len(m.seconds)} | {m.best:.3f} | {m.median:.3f} | {m.note} |")
    tables = report.setup.get("tables", [])
    if tables:
        lines += [
            "",
            "| table | _delta_log bytes | log files | data files | live files |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {t['table']} | {t['log_bytes']:,} | {t['log_files']} | {t['data_files']} | {t['live_files']} |"
            for t in tables
        ]
    setup = {key: value for key, value in report.setup.items() if key != "tables"}
    lines += ["", "setup: " + json.dumps(setup)]
    return "\n".join(lines)


def _log(message: str) -> None:
    print(f"    {message}", flush=True)


def main(argv: list[str] | None = None) -> Report | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", type=int, default=10_000)
    parser.add_argument("--share", type=float, default=0.2, help="share of the prefixes materialized (oldest first)")
    parser.add_argument("--storage", choices=[*STORAGES, "both"], default="both")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "imgemb-scale",
                        help="where the corpus and lake are cached between runs")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3, help="timings per cheap operation")
    parser.add_argument("--cycle-budget-s", type=float, default=300.0, help="seconds of reconciliation ticks to run")
    parser.add_argument("--automation", action="store_true", help="also time two automation evaluations")
    parser.add_argument("--s3", action="store_true", help="the raw-images root and sales export on a moto S3 server")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--profile", type=Path, help="write a cProfile of each repeatable operation here")
    parser.add_argument("--evaluate-automation", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.evaluate_automation:
        evaluate_automation_once()
        return None
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    report = Report(params={k: str(v) for k, v in vars(args).items()} | {"cpu_count": os.cpu_count()})
    print(f"corpus: {args.prefixes} prefixes under {work_dir}", flush=True)
    seconds, corpus = timed(lambda: build_corpus(work_dir, args.prefixes))
    report.setup |= {"images": corpus.images, "corpus_generation_s": corpus.seconds, "corpus_load_s": round(seconds, 1)}
    seconds, lake = timed(lambda: build_lake(work_dir, corpus, args.share, log=_log))
    report.setup |= {
        "materialized_prefixes": len(lake.written),
        "lake_write_s": lake.seconds,
        "lake_load_s": round(seconds, 1),
        "delta_commit_ms_first_100_prefixes": lake.commit_ms_first,
        "delta_commit_ms_last_100_prefixes": lake.commit_ms_last,
        "embeddings": "random float32 vectors (width 2048), not ResNet50",
    }
    print(f"lake: {len(lake.written)} prefixes materialized ({lake.seconds} s of writes)", flush=True)
    measure_lake(report, lake, args.repeat + 2)
    storages = STORAGES if args.storage == "both" else (args.storage,)
    with corpus_on_s3(corpus) if args.s3 else nullcontext((corpus, {})) as (measured, s3_env), environment(s3_env):
        cursor = full_fingerprints(report, measured)
        report.setup["discovery_cursor_bytes"] = len(cursor.encode())
        with tempfile.TemporaryDirectory(prefix="imgemb-scale-run-") as run_dir:
            for storage in storages:
                label = f"{storage}+s3" if args.s3 else storage
                print(f"{label}: fresh instance", flush=True)
                with instance_home(storage, Path(run_dir)) as (home, pg_url):
                    env = code_location_env(measured, lake.uri, home, pg_url) | s3_env
                    setting = Setting(storage, measured, lake, env, cursor, args.repeat, work_dir,
                                      Profiler(args.profile), label)  # fmt: skip
                    with environment(env):
                        measure_instance(report, setting, args.cycle_budget_s, args.automation)
                if args.json:
                    write_json(report, args.json)  # after each storage: a later failure keeps these
    print()
    print(markdown(report))
    return report


def write_json(report: Report, path: Path) -> None:
    measures = [asdict(m) | {"best": m.best, "median": m.median} for m in report.measures]
    path.write_text(json.dumps({**asdict(report), "measures": measures}, indent=1))


if __name__ == "__main__":
    main()
