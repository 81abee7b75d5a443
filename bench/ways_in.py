"""Every way in, side by side on the same corpus: seconds from the first action to the last embedded row readable.

    python -m bench.ways_in --corpus DIR [--ways model,cli,daemon,daemon_commands,ui,daft] [--rounds 1]
                            [--sensor-interval S] [--out DIR] [--timeout 1800]

DIR is a corpus in the article's layout (`DIR/raw-images/<prefix>/*.jpg`, `DIR/sales-data/*.parquet`;
`../shared/corpus/make_corpus.py` makes one). Each way runs on a fresh instance (the shipped `dagster.yaml`
in a fresh DAGSTER_HOME), a fresh lake and its own copy of the corpus, with random weights on the CPU:

- model: the pinned model-only reference (`python -m imgemb_assets.core.embedding_bench --reference`, as
  `bench.end_to_end` runs it), its images/s turned into the seconds the model alone needs for the
  corpus's expected rows (forward passes only: no process start, no decode);
- cli: no daemon; `imgemb discover` then `imgemb backfill-missing --asset image_embeddings` (in its process);
- daemon: `dagster-daemon run -w workspace.yaml` already up, the raw root empty; the prefixes are moved
  into it (one rename each) and nothing else is typed: the sensors, automation and runs do the rest.
  Once that is done and quiet (no run or backfill for two automation intervals), one more prefix (a copy of the corpus's median prefix under a new name)
  lands, and the time until its vectors are readable is measured too;
- daemon_commands: the daemon already up, the raw root full; the README's two commands
  (`imgemb discover`, `imgemb backfill-missing --asset image_embeddings`, which submits a backfill);
- ui: `dagster dev -w workspace.yaml` up; `imgemb discover`, then what the UI's "Materialize all" sends:
  a `launchPartitionBackfill` over every partition of `s3_prefix`, for every materializable asset;
- daft: the article's Daft pipeline (`../shared/reference/daft_seed.py`) in its own venv
  (`--daft-python`, default /tmp/venv-daft/bin/python), timed as a whole process.

The clock stops when the image_embeddings Delta table holds every expected row (polled every 0.5 s: the
current version's row count from its add actions). Runs launched and failed are those of the instance at
that moment; peak summed PSS is that of every process of the way (daemon, webserver, code servers,
commands, runs), sampled every second as in `bench.end_to_end`. Everything a way starts is in its own
process group, stopped at the end of the way (and at exit, on failure). The instance's timeline (sensor
ticks, backfills, runs queued/started/ended, steps) of each Dagster way is printed and written to
`--out`/timelines.json. Prints a table, the ratios to the CLI path and to Daft, and one JSON line last.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import print_summary
from bench.end_to_end import PssSampler, user_environment
from bench.ways_in_support import (
    ASSET_NODES_QUERY,
    LAUNCH_PARTITION_BACKFILL,
    PARTITION_KEYS_QUERY,
    decodable_ids,
    graphql,
    print_timeline,
    sales_ids,
    start_group,
    stop_all_groups,
    stop_group,
    table_rows,
    timeline,
)

_REPO = Path(__file__).resolve().parents[1]
_BIN = Path(sys.executable).parent
_DAFT_SCRIPT = _REPO.parent / "shared" / "reference" / "daft_seed.py"
WAYS = ("model", "cli", "daemon", "daemon_commands", "ui", "daft")
POLL_S = 0.5


class WayFailed(Exception):
    pass


@dataclass
class WayResult:
    way: str
    seconds: float | None = None
    rows: int = 0
    expected_rows: int = 0
    runs: int | None = None
    failed_runs: int | None = None
    peak_pss_mb: float | None = None
    extra: dict[str, object] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Corpus:
    root: Path
    prefixes: tuple[str, ...]
    expected_rows: int  # imgemb: decodable images of any accepted format with a sales row
    daft_expected_rows: int  # the Daft script globs **/*.jpg
    late_source: str  # the prefix copied as the late one in the daemon way
    late_rows: int

    @staticmethod
    def read(root: Path) -> Corpus:
        raw = root / "raw-images"
        prefixes = tuple(sorted(p.name for p in raw.iterdir() if p.is_dir()))
        sold = sales_ids(root / "sales-data")
        rows = {p: len(decodable_ids(raw / p) & sold) for p in prefixes}
        median = sorted(prefixes, key=lambda p: rows[p])[len(prefixes) // 2]
        return Corpus(
            root=root,
            prefixes=prefixes,
            expected_rows=sum(rows.values()),
            daft_expected_rows=len(decodable_ids(raw, (".jpg",)) & sold),
            late_source=median,
            late_rows=rows[median],
        )


# --- shared pieces ------------------------------------------------------------------------------------------------


def way_environment(corpus: Corpus, workdir: Path, sensor_interval: int | None, raw_root: Path) -> dict[str, str]:
    """The user's variables (bench.end_to_end's), with this way's own copy of the raw root and sales."""
    shutil.copytree(corpus.root / "sales-data", workdir / "sales-data")
    env = user_environment(corpus.root, workdir)
    env |= {
        "IMGEMB_RAW_IMAGES_URI": str(raw_root),
        "IMGEMB_SALES_URI": str(workdir / "sales-data"),
        "CUDA_VISIBLE_DEVICES": "",
    }
    if sensor_interval is not None:
        env["IMGEMB_SENSOR_INTERVAL_S"] = str(sensor_interval)
    return env


def open_instance(env: Mapping[str, str]):  # a DagsterInstance
    from dagster import DagsterInstance

    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    return DagsterInstance.get()


class DagsterWay:
    """A Dagster way's instance, and when the way's first action came (its clock; None until it starts)."""

    def __init__(self, instance) -> None:  # a DagsterInstance
        self.instance = instance
        self.t0: float | None = None

    def start_clock(self) -> float:
        self.t0 = time.time()
        return self.t0

    def record_readable(self, result: WayResult, readable: float, sampler: PssSampler) -> None:
        """The clock stops at `readable`: the seconds since the first action, the runs and the peak PSS so far."""
        assert self.t0 is not None, "the clock never started"
        result.seconds = readable - self.t0
        result.runs, result.failed_runs = runs_so_far(self.instance)
        result.peak_pss_mb = sampler.peak_kb / 1024


@contextmanager
def dagster_way(env: Mapping[str, str], result: WayResult) -> Iterator[DagsterWay]:
    """The way's instance, opened before any of its processes starts (so that they do not race to create its
    storage); at the end, its timeline from the way's first action into `result`, and the instance disposed."""
    way = DagsterWay(open_instance(env))
    try:
        yield way
    finally:
        if way.t0 is not None:
            result.extra["timeline"] = timeline(way.instance, way.t0)
        way.instance.dispose()


def embeddings_table(env: Mapping[str, str]) -> str:
    return f"{env['IMGEMB_LAKE_URI']}/image_embeddings"


def record_when_quiet(instance, args: argparse.Namespace, result: WayResult) -> None:
    """Once nothing has run for two automation intervals: the runs so far, and partitions written more than once."""
    result.extra["quiet_after_s"] = wait_until_quiet(instance, 2 * automation_interval(args) + 5, args.timeout)
    result.extra["runs_when_quiet"], result.extra["failed_runs_when_quiet"] = runs_so_far(instance)
    result.extra["partitions_written_twice"] = partitions_written_twice(instance)


def automation_interval(args: argparse.Namespace) -> int:
    from imgemb_assets.dagster_wiring.location.settings import LocationSettings

    return LocationSettings(sensor_interval_s=args.sensor_interval).automation_interval_s()


def discovery_interval(args: argparse.Namespace) -> int:
    """The discovery sensor's interval on the way's local root."""
    from imgemb_assets.dagster_wiring.location.settings import LocationSettings

    return LocationSettings(sensor_interval_s=args.sensor_interval, raw_images_uri="/local").discovery_interval_s()


def runs_so_far(instance) -> tuple[int, int]:
    from dagster import DagsterRunStatus

    records = instance.get_run_records()
    return len(records), sum(r.dagster_run.status == DagsterRunStatus.FAILURE for r in records)


def partitions_written_twice(instance) -> dict[str, int]:
    """Per table of the prefix chain, how many of its partitions were materialized more than once."""
    from collections import Counter

    from dagster import AssetKey

    from imgemb_assets.dagster_wiring.names import PREFIX_CHAIN_ASSETS

    twice = {}
    for asset in PREFIX_CHAIN_ASSETS:
        records = instance.fetch_materializations(AssetKey(asset), limit=10_000).records  # Dagster's most per call
        counts = Counter(record.partition_key for record in records)
        twice[asset] = sum(count > 1 for count in counts.values())
    return {asset: count for asset, count in twice.items() if count}


def wait_for_rows(
    table: str, expected: int, timeout_s: float, failed: Callable[[], str | None] = lambda: None
) -> tuple[float, int]:
    """(time the table first held `expected` rows, rows then); raises when `failed` says why or on time-out."""
    deadline = time.time() + timeout_s
    rows = 0
    while time.time() < deadline:
        rows = table_rows(table)
        if rows >= expected:
            return time.time(), rows
        if (why := failed()) is not None:
            rows = table_rows(table)
            if rows >= expected:
                return time.time(), rows
            raise WayFailed(f"{why} ({rows}/{expected} rows)")
        time.sleep(POLL_S)
    raise WayFailed(f"{rows}/{expected} rows after {timeout_s:.0f} s")


class Commands(threading.Thread):
    """Commands run one after another as a user types them, each its own process (group), in a thread."""

    def __init__(self, commands: list[list[str]], env: Mapping[str, str], log: Path, sampler: PssSampler) -> None:
        super().__init__(daemon=True)
        self.commands, self.env, self.log, self.sampler = commands, env, log, sampler
        self.error: str | None = None
        self.seconds: list[float] = []

    def run(self) -> None:
        for command in self.commands:
            started = time.time()
            process = start_group(command, self.env, _REPO, self.log)
            self.sampler.roots.append(process.pid)
            code = process.wait()
            stop_group(process, grace_s=5)
            self.seconds.append(round(time.time() - started, 2))
            if code != 0:
                self.error = f"{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(command))} failed ({code})"
                return

    def failed(self) -> str | None:
        return self.error


def readme_commands(env: Mapping[str, str], workdir: Path, sampler: PssSampler) -> Commands:
    """The README's two commands: `imgemb discover`, then `imgemb backfill-missing --asset image_embeddings`."""
    imgemb = str(_BIN / "imgemb")
    return Commands([[imgemb, "discover"], [imgemb, "backfill-missing", "--asset", "image_embeddings"]],
                    env, workdir / "commands.log", sampler)  # fmt: skip


def start_daemon(env: Mapping[str, str], instance, sampler: PssSampler, log: Path) -> subprocess.Popen:
    """`dagster-daemon run -w workspace.yaml`, its processes sampled; returns once its heartbeat is in `instance`."""
    daemon = start_group([str(_BIN / "dagster-daemon"), "run", "-w", str(_REPO / "workspace.yaml")], env, _REPO, log)
    sampler.roots.append(daemon.pid)
    wait_for_daemon(instance, daemon, log)
    return daemon


def wait_for_daemon(instance, process: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    from imgemb_assets.dagster_wiring.backfills import daemon_is_running

    deadline = time.time() + timeout_s
    while not daemon_is_running(instance):
        if process.poll() is not None or time.time() > deadline:
            raise WayFailed(f"the daemon did not start; see {log}")
        time.sleep(0.5)


def wait_for_runs_to_end(instance, timeout_s: float = 120) -> None:
    """Lets the runs in flight end before their daemon is stopped (a run killed with it would show as failed)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(not r.is_finished for r in instance.get_runs()):
        time.sleep(1)


def wait_until_quiet(instance, quiet_s: float, timeout_s: float) -> float:
    """Waits until no run is unfinished and no backfill in progress for `quiet_s` in a row; seconds waited."""
    from dagster._core.execution.backfill import BulkActionStatus

    started = time.time()
    quiet_since: float | None = None
    while time.time() - started < timeout_s:
        busy = any(not r.is_finished for r in instance.get_runs()) or any(
            b.status == BulkActionStatus.REQUESTED for b in instance.get_backfills()
        )
        now = time.time()
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= quiet_s:
            return round(now - started, 1)
        time.sleep(1)
    raise WayFailed(f"still busy after {timeout_s:.0f} s")


# --- the ways -----------------------------------------------------------------------------------------------------


def way_model(corpus: Corpus, workdir: Path, args: argparse.Namespace, result: WayResult) -> None:
    """The pinned reference bench.end_to_end uses (same command), in a process whose PSS is sampled."""
    log = workdir / "model.log"
    with PssSampler().running() as sampler:
        process = start_group(
            [sys.executable, "-m", "imgemb_assets.core.embedding_bench", "--reference", "--images", "128", "--rounds", "2",
             "--corpus", str(corpus.root / "raw-images")],
            {**os.environ, "CUDA_VISIBLE_DEVICES": ""}, _REPO, log,
        )  # fmt: skip
        sampler.roots.append(process.pid)
        code = process.wait()
        stop_group(process, grace_s=5)
    if code != 0:
        raise WayFailed(f"embedding_bench --reference failed ({code}); see {log}")
    img_s = float(json.loads(log.read_text().strip().splitlines()[-1])["model_only_img_s"])
    result.seconds = corpus.expected_rows / img_s
    result.rows = corpus.expected_rows
    result.runs, result.failed_runs = 0, 0
    result.peak_pss_mb = sampler.peak_kb / 1024
    result.extra["model_only_img_s"] = round(img_s, 2)


def way_cli(corpus: Corpus, workdir: Path, args: argparse.Namespace, result: WayResult) -> None:
    shutil.copytree(corpus.root / "raw-images", workdir / "raw-images")
    env = way_environment(corpus, workdir, args.sensor_interval, workdir / "raw-images")
    table = embeddings_table(env)
    with dagster_way(env, result) as way, PssSampler().running() as sampler:
        commands = readme_commands(env, workdir, sampler)
        t0 = way.start_clock()
        commands.start()
        readable, result.rows = wait_for_rows(table, corpus.expected_rows, args.timeout, commands.failed)
        way.record_readable(result, readable, sampler)
        commands.join(timeout=args.timeout)
        result.extra["command_seconds"] = commands.seconds
        result.extra["command_end_s"] = round(time.time() - t0, 2)


def way_daemon(corpus: Corpus, workdir: Path, args: argparse.Namespace, result: WayResult) -> None:
    raw, landing = workdir / "raw-images", workdir / "landing"
    raw.mkdir()
    shutil.copytree(corpus.root / "raw-images", landing)
    late = _late_prefix_name(corpus)
    shutil.copytree(landing / corpus.late_source, workdir / "late" / late)
    env = way_environment(corpus, workdir, args.sensor_interval, raw)
    table = embeddings_table(env)
    with dagster_way(env, result) as way, PssSampler().running() as sampler:
        instance = way.instance
        daemon = start_daemon(env, instance, sampler, workdir / "daemon.log")
        t0 = way.start_clock()
        for prefix in corpus.prefixes:  # one rename each: a prefix lands whole
            os.rename(landing / prefix, raw / prefix)
        readable, result.rows = wait_for_rows(table, corpus.expected_rows, args.timeout, _died(daemon, "the daemon"))
        way.record_readable(result, readable, sampler)
        # The new prefix lands once the first ones are done and nothing runs (an automation tick passed).
        record_when_quiet(instance, args, result)
        t1 = time.time()
        os.rename(workdir / "late" / late, raw / late)
        landed_readable, rows = wait_for_rows(
            table, corpus.expected_rows + corpus.late_rows, args.timeout, _died(daemon, "the daemon")
        )
        result.extra["late_prefix"] = f"{late} (a copy of {corpus.late_source}: {corpus.late_rows} rows)"
        result.extra["landing_to_readable_s"] = round(landed_readable - t1, 2)
        result.extra["late_prefix_at_s"] = round(t1 - t0, 2)
        runs_then, failed_then = runs_so_far(instance)
        result.extra["late_runs"] = runs_then - result.extra["runs_when_quiet"]
        result.extra["late_failed_runs"] = failed_then - result.extra["failed_runs_when_quiet"]
        result.extra["peak_pss_mb_overall"] = round(sampler.peak_kb / 1024)
        wait_for_runs_to_end(instance)
        stop_group(daemon)


def way_daemon_commands(corpus: Corpus, workdir: Path, args: argparse.Namespace, result: WayResult) -> None:
    shutil.copytree(corpus.root / "raw-images", workdir / "raw-images")
    env = way_environment(corpus, workdir, args.sensor_interval, workdir / "raw-images")
    table = embeddings_table(env)
    with dagster_way(env, result) as way, PssSampler().running() as sampler:
        daemon = start_daemon(env, way.instance, sampler, workdir / "daemon.log")
        commands = readme_commands(env, workdir, sampler)
        way.start_clock()
        commands.start()
        died = _died(daemon, "the daemon")
        readable, result.rows = wait_for_rows(
            table, corpus.expected_rows, args.timeout, lambda: commands.failed() or died()
        )
        way.record_readable(result, readable, sampler)
        commands.join(timeout=60)
        result.extra["command_seconds"] = commands.seconds
        result.extra["submitted"] = "submitted asset backfill" in (workdir / "commands.log").read_text()
        # Whatever the commands or automation queued after the last row must not write a partition again.
        record_when_quiet(way.instance, args, result)
        wait_for_runs_to_end(way.instance)
        stop_group(daemon)


def way_ui(corpus: Corpus, workdir: Path, args: argparse.Namespace, result: WayResult) -> None:
    from imgemb_support.dagster_webserver import webserver_answers
    from imgemb_support.moto_server import free_port

    shutil.copytree(corpus.root / "raw-images", workdir / "raw-images")
    env = way_environment(corpus, workdir, args.sensor_interval, workdir / "raw-images")
    imgemb = str(_BIN / "imgemb")
    table = embeddings_table(env)
    log = workdir / "dagster-dev.log"
    port = free_port()
    with dagster_way(env, result) as way, PssSampler().running() as sampler:
        dev = start_group(
            [str(_BIN / "dagster"), "dev", "-w", str(_REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
            env, _REPO, log,
        )  # fmt: skip
        sampler.roots.append(dev.pid)
        deadline = time.time() + 240
        while not webserver_answers(port):
            if dev.poll() is not None or time.time() > deadline:
                raise WayFailed(f"dagster dev did not answer; see {log}")
            time.sleep(1)
        wait_for_daemon(way.instance, dev, log)
        graphql(port, ASSET_NODES_QUERY)  # the UI's page is open: its location is loaded
        t0 = way.start_clock()
        commands = Commands([[imgemb, "discover"]], env, workdir / "commands.log", sampler)
        commands.run()  # in this thread: the click comes after it
        if commands.error:
            raise WayFailed(commands.error)
        t_click = time.time()
        nodes = graphql(port, ASSET_NODES_QUERY)["assetNodes"]
        keys = graphql(port, PARTITION_KEYS_QUERY, {"key": {"path": ["image_embeddings"]}})
        partitions = keys["assetNodeOrError"]["partitionKeysByDimension"][0]["partitionKeys"]
        every = [n["assetKey"] for n in nodes if n["isMaterializable"]]
        partitioned = [n["assetKey"] for n in nodes if n["isMaterializable"] and n["isPartitioned"]]
        launched, selection = None, "every materializable asset"
        for assets, what in ((every, "every materializable asset"), (partitioned, "the partitioned assets")):
            answer = graphql(port, LAUNCH_PARTITION_BACKFILL, {"backfillParams": {
                "assetSelection": assets, "partitionNames": partitions, "fromFailure": False, "tags": []}})  # fmt: skip
            launched = answer["launchPartitionBackfill"]
            if launched["__typename"] == "LaunchBackfillSuccess":
                selection = what
                break
            result.extra.setdefault("refused", []).append(f"{what}: {json.dumps(launched)[:300]}")
        if launched is None or launched["__typename"] != "LaunchBackfillSuccess":
            raise WayFailed(f"launchPartitionBackfill refused: {result.extra.get('refused')}")
        result.extra["backfill"] = launched["backfillId"]
        result.extra["backfill_assets"] = f"{selection}: {len(assets)} assets x {len(partitions)} partitions"
        result.extra["discover_s"] = round(t_click - t0, 2)
        result.extra["click_s"] = round(time.time() - t_click, 2)
        readable, result.rows = wait_for_rows(table, corpus.expected_rows, args.timeout, _died(dev, "dagster dev"))
        way.record_readable(result, readable, sampler)
        wait_for_runs_to_end(way.instance)
        left = stop_group(dev)
        if left:
            result.extra["killed_after_sigterm"] = left


def way_daft(corpus: Corpus, workdir: Path, args: argparse.Namespace, result: WayResult) -> None:
    data = workdir / "corpus"
    shutil.copytree(corpus.root / "raw-images", data / "raw-images")
    shutil.copytree(corpus.root / "sales-data", data / "sales-data")
    out = workdir / "delta" / "images-sales-embeddings"
    log = workdir / "daft.log"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    with PssSampler().running() as sampler:
        t0 = time.time()
        process = start_group(
            [args.daft_python, str(_DAFT_SCRIPT), "--data", str(data), "--out", str(out)], env, _REPO, log
        )
        sampler.roots.append(process.pid)
        readable, result.rows = wait_for_rows(
            str(out), corpus.daft_expected_rows, args.timeout, _died(process, "daft_seed.py", ok=True)
        )
        result.seconds = readable - t0
        result.peak_pss_mb = sampler.peak_kb / 1024
        code = process.wait(timeout=120)
        result.extra["process_s"] = round(time.time() - t0, 2)
        stop_group(process, grace_s=5)
    if code != 0:
        raise WayFailed(f"daft_seed.py failed ({code}); see {log}")
    result.expected_rows = corpus.daft_expected_rows
    result.runs, result.failed_runs = 0, 0
    metrics = json.loads(log.read_text().strip().splitlines()[-1])
    result.extra["daft_seconds"] = metrics.get("seconds")


def _died(process: subprocess.Popen, what: str, ok: bool = False) -> Callable[[], str | None]:
    def check() -> str | None:
        code = process.poll()
        if code is None or (ok and code == 0):
            return None
        return f"{what} exited ({code})"

    return check


def _late_prefix_name(corpus: Corpus) -> str:
    return f"{corpus.prefixes[-1]}-late"


_RUNNERS: dict[str, Callable[[Corpus, Path, argparse.Namespace, WayResult], None]] = {
    "model": way_model,
    "cli": way_cli,
    "daemon": way_daemon,
    "daemon_commands": way_daemon_commands,
    "ui": way_ui,
    "daft": way_daft,
}


def run_way(way: str, corpus: Corpus, args: argparse.Namespace, round_number: int) -> WayResult:
    result = WayResult(way, expected_rows=corpus.expected_rows)
    with tempfile.TemporaryDirectory(prefix=f"imgemb-ways-{way}-") as tmp:
        workdir = Path(tmp)
        try:
            _RUNNERS[way](corpus, workdir, args, result)
        except Exception as exc:  # one way failing must not stop the others
            result.error = f"{type(exc).__name__}: {exc}"[:500]
            traceback.print_exc()
        finally:
            stop_all_groups()
            for log in workdir.glob("*.log"):
                shutil.copy(log, args.out / f"r{round_number + 1}-{way}-{log.name}")
    return result


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="DIR with raw-images/ and sales-data/")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, in this order; of {','.join(WAYS)}")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--sensor-interval", type=int, default=None, help="IMGEMB_SENSOR_INTERVAL_S (default: unset, 30)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds each wait may take")
    parser.add_argument("--daft-python", default="/tmp/venv-daft/bin/python")
    parser.add_argument("--out", type=Path, default=None, help="folder for logs and timelines.json")
    args = parser.parse_args(argv)
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if unknown := set(ways) - set(WAYS):
        parser.error(f"unknown ways: {sorted(unknown)}")
    args.out = args.out or Path(tempfile.mkdtemp(prefix="imgemb-ways-in-"))
    args.out.mkdir(parents=True, exist_ok=True)
    atexit.register(stop_all_groups)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that every group is stopped on the way out
    corpus = Corpus.read(args.corpus.resolve())
    print(
        f"corpus {corpus.root}: {len(corpus.prefixes)} prefixes, {corpus.expected_rows} expected rows "
        f"({corpus.daft_expected_rows} for Daft's *.jpg glob); discovery sensor interval {discovery_interval(args)} s, "
        f"automation {automation_interval(args)} s (IMGEMB_SENSOR_INTERVAL_S "
        f"{args.sensor_interval if args.sensor_interval is not None else 'unset'}); logs in {args.out}",
        flush=True,
    )
    started = time.time()
    results: dict[str, list[WayResult]] = {w: [] for w in ways}
    timelines: dict[str, object] = {}
    for round_number in range(args.rounds):
        order = ways if round_number % 2 == 0 else list(reversed(ways))
        for way in order:
            result = run_way(way, corpus, args, round_number)
            line = result.extra.pop("timeline", None)
            if line is not None:
                timelines[f"round{round_number + 1}/{way}"] = line
            results[way].append(result)
            print(
                f"round {round_number + 1} {way}: {_fmt(result.seconds)} s, {result.rows}/{result.expected_rows} rows, "
                f"runs {result.runs} ({result.failed_runs} failed), peak PSS {_fmt(result.peak_pss_mb, 0)} MB"
                + (f", ERROR {result.error}" if result.error else "")
                + (f"; {json.dumps(result.extra)}" if result.extra else ""),
                flush=True,
            )
            if line is not None:
                print_timeline(f"round {round_number + 1} {way}", line)
                (args.out / "timelines.json").write_text(json.dumps(timelines, indent=1))
            sys.stdout.flush()

    def best(way: str) -> WayResult | None:
        done = [r for r in results.get(way, []) if r.seconds is not None and r.error is None]
        return min(done, key=lambda r: r.seconds) if done else None

    cli, daft = best("cli"), best("daft")
    # Speed ratios, as the targets are put: CLI seconds / the way's seconds (above 1: faster than the CLI path).
    print(
        "\n| way | seconds to last row readable | speed x CLI path | speed x Daft | rows | runs | failed runs "
        "| partitions written twice | peak summed PSS MB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    summary_ways: dict[str, object] = {}
    for way in ways:
        result = best(way)
        if result is None:
            failed = results[way][-1]
            print(f"| {way} | not done: {failed.error} | | | | | | | |")
            summary_ways[way] = {"error": failed.error}
            continue
        over_cli = cli.seconds / result.seconds if cli else None
        over_daft = daft.seconds / result.seconds if daft else None
        twice = result.extra.get("partitions_written_twice")
        print(
            f"| {way} | {result.seconds:.1f} | {_fmt(over_cli, 2)} | {_fmt(over_daft, 2)} | {result.rows}/{result.expected_rows} "
            f"| {result.runs} | {result.failed_runs} | {'-' if twice is None else (twice or 'none')} "
            f"| {_fmt(result.peak_pss_mb, 0)} |"
        )
        entry = {k: v for k, v in asdict(result).items() if k not in ("way", "extra", "error")}
        entry["seconds"] = round(result.seconds, 2)
        entry["peak_pss_mb"] = None if result.peak_pss_mb is None else round(result.peak_pss_mb)
        entry["speed_x_cli"] = None if over_cli is None else round(over_cli, 3)
        entry["speed_x_daft"] = None if over_daft is None else round(over_daft, 3)
        if len(results[way]) > 1:
            entry["median_seconds"] = round(
                statistics.median(r.seconds for r in results[way] if r.seconds is not None), 2
            )
        entry |= result.extra
        summary_ways[way] = entry
    daemon = best("daemon")
    if daemon is not None and "landing_to_readable_s" in daemon.extra:
        print(f"\nnew prefix landing -> its vectors readable (daemon path): {daemon.extra['landing_to_readable_s']} s "
              f"({daemon.extra['late_prefix']}; {daemon.extra['late_runs']} runs)")  # fmt: skip
    summary: dict[str, object] = {
        "corpus": str(corpus.root),
        "prefixes": len(corpus.prefixes),
        "expected_rows": corpus.expected_rows,
        "discovery_interval_s": discovery_interval(args),
        "automation_interval_s": automation_interval(args),
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "total_seconds": round(time.time() - started, 1),
        "timelines": str(args.out / "timelines.json"),
        "ways": summary_ways,
    }
    print()
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
