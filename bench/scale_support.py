"""What `bench.scale` measures against: a cached corpus and lake of many prefixes, instances, the UI server.

- `build_corpus`: N prefix folders of 1-3 tiny JPEGs each (date-named, one per
  day from 2000-01-01, so they sort by recency as the discovery sensor assumes),
  100 more kept outside the root until a tick needs new prefixes, and one sales
  parquet covering most images. Cached under the work dir (a marker holds its
  parameters).
- `build_lake`: the tables of a share of the prefixes, written through the
  project's own code paths (`build_manifest`, `downscale_partition`,
  `join_with_sales`, `Lake.write_partition[_stream]`), one Delta commit per
  partition per table as the assets make. Embeddings are random float32 vectors
  of the model's width in the asset's schema (ResNet50 on CPU for thousands of
  partitions would take hours; the Delta log does not depend on the values).
  Resumable: each finished prefix is appended to a progress file.
- `record_state`: the events the sensors and assets would have stored for that
  state, as runless materializations (no run is executed).
- `corpus_on_s3`: the same corpus uploaded to a moto S3 server (the lake stays local).
- `instance_home`: a DAGSTER_HOME with the shipped dagster.yaml, on SQLite or on
  a fresh PostgreSQL server (`imgemb_support.postgres_server`).
- `running_webserver` / `graphql_seconds`: `dagster-webserver` on the code
  location, and the GraphQL queries the UI's asset page sends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import yaml

from imgemb_assets.core.embedding.backbones.specs import BACKBONE_SPECS
from imgemb_assets.core.sample.dataset import write_sales_export
from imgemb_support.postgres_server import PG_URL_VARIABLE, running_postgres_server, with_postgres_storage

REPO: Final = Path(__file__).resolve().parents[1]
BIN: Final = Path(sys.executable).parent
FIRST_DAY: Final = date(2000, 1, 1)
NEW_PREFIXES: Final = 100
EMBEDDING_WIDTH: Final = BACKBONE_SPECS["resnet50"].width
BENCH_MODEL_ID: Final = "bench-random-float32-2048"
S3_BUCKET: Final = "imgemb-scale"
_CORPUS_MARKER: Final = "corpus.json"
_LAKE_MARKER: Final = "lake.json"
_LAKE_PROGRESS: Final = "lake-progress.jsonl"
_RNG: Final = np.random.default_rng(0)  # the vectors' values matter to nothing measured here


# ---------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    root: str  # holds raw-images/, incoming/ and sales-data/
    raw_images_uri: str
    incoming: str  # the new prefixes' folders, moved into the root only while a tick needs them
    sales_uri: str
    prefixes: list[str]
    new_prefixes: list[str]
    images: int
    seconds: float  # to generate it (when it was generated)


def prefix_names(count: int, first: int = 0) -> list[str]:
    """Date prefixes, one per day: `count` of them from day `first` after 2000-01-01."""
    return [(FIRST_DAY + timedelta(days=first + day)).isoformat() for day in range(count)]


def build_corpus(work_dir: Path, prefixes: int, seed: int = 0) -> Corpus:
    """The root of `prefixes` prefixes (and the new ones beside it), generated once per parameters."""
    root = work_dir / f"corpus-{prefixes}"
    params = {"prefixes": prefixes, "new_prefixes": NEW_PREFIXES, "seed": seed, "version": 1}
    marker = root / _CORPUS_MARKER
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved["params"] == params:
            corpus = Corpus(**saved["corpus"])
            restore_new_prefixes(corpus)  # a run killed mid-measurement left them in the root
            return corpus
    started = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    raw, incoming, sales = root / "raw-images", root / "incoming", root / "sales-data"
    names, new = prefix_names(prefixes), prefix_names(NEW_PREFIXES, first=prefixes)
    image_ids: list[str] = []
    for index, prefix in enumerate(names + new):
        folder = (raw if index < prefixes else incoming) / prefix
        folder.mkdir(parents=True)
        for number in range(int(rng.integers(1, 4))):
            image_ids.append(_write_tiny_jpeg(folder, f"img_{index:06d}_{number}", rng))
    _write_sales(sales, image_ids, rng)
    corpus = Corpus(
        root=str(root),
        raw_images_uri=str(raw),
        incoming=str(incoming),
        sales_uri=str(sales),
        prefixes=names,
        new_prefixes=new,
        images=len(image_ids),
        seconds=round(time.perf_counter() - started, 1),
    )
    marker.write_text(json.dumps({"params": params, "corpus": asdict(corpus)}))
    return corpus


def _write_tiny_jpeg(folder: Path, image_id: str, rng: np.random.Generator) -> str:
    from imgemb_assets.core.imaging.synthetic import synthetic_photo

    width, height = (int(v) for v in rng.integers(32, 160, size=2))
    synthetic_photo(rng, width, height).save(folder / f"{image_id}.jpg", format="JPEG", quality=80)
    return image_id


def _write_sales(sales_root: Path, image_ids: Sequence[str], rng: np.random.Generator) -> None:
    # ~90% of the images sell, and a few sales rows have no image: the inner join drops some rows.
    covered = [image_id for image_id in image_ids if rng.random() < 0.9]
    write_sales_export(sales_root, covered + [f"img_orphan_{number:04d}" for number in range(20)], rng)


@contextmanager
def new_prefixes_in_root(corpus: Corpus) -> Iterator[None]:
    """The new prefixes in the root, and out of it afterwards: a folder rename each, or an upload on S3."""
    if corpus.raw_images_uri.startswith("s3://"):
        with _new_prefixes_on_s3(corpus):
            yield
        return
    for prefix in corpus.new_prefixes:
        os.rename(Path(corpus.incoming) / prefix, Path(corpus.raw_images_uri) / prefix)
    try:
        yield
    finally:
        restore_new_prefixes(corpus)


def restore_new_prefixes(corpus: Corpus) -> None:
    if corpus.raw_images_uri.startswith("s3://"):
        return
    for prefix in corpus.new_prefixes:
        inside = Path(corpus.raw_images_uri) / prefix
        if inside.is_dir():
            os.rename(inside, Path(corpus.incoming) / prefix)


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `values` set (the in-process instance and resources read it), restored after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def corpus_on_s3(corpus: Corpus) -> Iterator[tuple[Corpus, dict[str, str]]]:
    """The corpus's raw images and sales export uploaded to a moto server; (the corpus there, its AWS variables).

    The new prefixes stay local until a tick needs them. The lake stays local.
    """
    from imgemb_assets.core.storage.s3 import S3Settings
    from imgemb_support.moto_server import client_environment, running_moto_server

    with running_moto_server() as endpoint:
        env = client_environment(endpoint)
        with environment(env):
            client = S3Settings().client()
            client.create_bucket(Bucket=S3_BUCKET)
            uploads = [(path, f"raw-images/{path.relative_to(corpus.raw_images_uri).as_posix()}")
                       for path in Path(corpus.raw_images_uri).rglob("*") if path.is_file()]  # fmt: skip
            uploads += [(path, f"sales-data/{path.name}") for path in Path(corpus.sales_uri).glob("*.parquet")]
            _upload(client, uploads)
        yield (
            Corpus(**{**asdict(corpus), "raw_images_uri": f"s3://{S3_BUCKET}/raw-images",
                      "sales_uri": f"s3://{S3_BUCKET}/sales-data"}),
            env,
        )  # fmt: skip


@contextmanager
def _new_prefixes_on_s3(corpus: Corpus) -> Iterator[None]:
    from imgemb_assets.core.storage.s3 import S3Settings

    client = S3Settings().client()
    uploads = [(path, f"raw-images/{path.relative_to(corpus.incoming).as_posix()}")
               for prefix in corpus.new_prefixes for path in (Path(corpus.incoming) / prefix).iterdir()]  # fmt: skip
    _upload(client, uploads)
    try:
        yield
    finally:
        keys = [{"Key": key} for _, key in uploads]
        for start in range(0, len(keys), 1000):
            client.delete_objects(Bucket=S3_BUCKET, Delete={"Objects": keys[start : start + 1000]})


def _upload(client: Any, uploads: Sequence[tuple[Path, str]]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(lambda item: client.put_object(Bucket=S3_BUCKET, Key=item[1], Body=item[0].read_bytes()), uploads)
        )


# ---------------------------------------------------------------------------- lake


@dataclass(frozen=True)
class LakeState:
    """A lake with a share of the corpus materialized, as `build_lake` left it."""

    uri: str
    written: list[PrefixWritten]
    sales_fingerprint: str
    sales_rows: int
    seconds: float  # to write it (the runs that wrote part of it, summed)
    commit_ms_first: float  # mean time of one Delta commit over the first and the last 100 prefixes
    commit_ms_last: float


@dataclass(frozen=True)
class PrefixWritten:
    """One materialized prefix: its listing's fingerprint and each table's row count."""

    prefix: str
    fingerprint: str
    rows: dict[str, int]


def materialized_prefixes(corpus: Corpus, share: float) -> list[str]:
    """The oldest `share` of the prefixes: a backlog being worked through from the start."""
    return corpus.prefixes[: round(len(corpus.prefixes) * share)]


def build_lake(work_dir: Path, corpus: Corpus, share: float, log: Any = print) -> LakeState:
    """The lake with `share` of the corpus materialized; written once, resumed if interrupted."""
    from imgemb_assets.core.ingest.discovery import listing_fingerprint
    from imgemb_assets.core.lake import tables
    from imgemb_assets.core.lake.lake import Lake
    from imgemb_assets.core.sales.join import list_sales_files, read_sales
    from imgemb_assets.core.storage.local_store import LocalObjectStore

    root = work_dir / f"lake-{len(corpus.prefixes)}-{share:g}"
    params = {"corpus": corpus.root, "prefixes": len(corpus.prefixes), "share": share, "version": 1}
    marker, progress = root / _LAKE_MARKER, root / _LAKE_PROGRESS
    if marker.is_file() and json.loads(marker.read_text())["params"] == params:
        return _lake_state_from(json.loads(marker.read_text())["state"])
    started_params = root / "params.json"
    if not (started_params.is_file() and json.loads(started_params.read_text()) == params):
        shutil.rmtree(root, ignore_errors=True)
        (root / "delta").mkdir(parents=True)
        started_params.write_text(json.dumps(params))
    lake = Lake(str(root / "delta"))
    raw, sales_store = LocalObjectStore(Path(corpus.raw_images_uri)), LocalObjectStore(Path(corpus.sales_uri))
    # The `sales` asset: the export validated against the lake, then the table replaced.
    sales_table = read_sales(sales_store, lake)
    lake.overwrite(tables.SALES, sales_table)
    sales_table = lake.read(tables.SALES)
    done = _read_progress(progress)
    todo = [prefix for prefix in materialized_prefixes(corpus, share) if prefix not in {w.prefix for w in done}]
    log(f"lake: {len(done)} prefixes already written, {len(todo)} to write ({5 * len(todo)} Delta commits)")
    session_started = time.perf_counter()
    with progress.open("a") as out:
        for count, prefix in enumerate(todo, start=1):
            step_started = time.perf_counter()
            written = write_prefix(lake, raw, prefix, sales_table)
            entry = asdict(written) | {"seconds": time.perf_counter() - step_started}
            out.write(json.dumps(entry) + "\n")
            out.flush()
            if count % 200 == 0 or count == len(todo):
                log(f"lake: {count}/{len(todo)} prefixes, {time.perf_counter() - session_started:.0f} s")
    entries = [json.loads(line) for line in progress.read_text().splitlines()]
    seconds_each = [entry["seconds"] for entry in entries]
    state = LakeState(
        uri=str(root / "delta"),
        written=[PrefixWritten(e["prefix"], e["fingerprint"], e["rows"]) for e in entries],
        sales_fingerprint=listing_fingerprint(list_sales_files(sales_store)),
        sales_rows=sales_table.num_rows,
        seconds=round(sum(seconds_each), 1),
        commit_ms_first=round(1000 * float(np.mean(seconds_each[:100])) / 5, 1),
        commit_ms_last=round(1000 * float(np.mean(seconds_each[-100:])) / 5, 1),
    )
    marker.write_text(json.dumps({"params": params, "state": asdict(state)}))
    return state


def _lake_state_from(saved: Mapping[str, Any]) -> LakeState:
    return LakeState(**{**saved, "written": [PrefixWritten(**entry) for entry in saved["written"]]})


def _read_progress(progress: Path) -> list[PrefixWritten]:
    if not progress.is_file():
        return []
    entries = []
    for line in progress.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut short by an interruption: that prefix is written again
        entries.append(PrefixWritten(entry["prefix"], entry["fingerprint"], entry["rows"]))
    return entries


def write_prefix(lake: Any, raw: Any, prefix: str, sales_table: pa.Table) -> PrefixWritten:
    """Every partitioned table of one prefix, as the four steps write them: five Delta commits."""
    from imgemb_assets.core.ingest.discovery import listing_fingerprint
    from imgemb_assets.core.ingest.manifest import build_manifest
    from imgemb_assets.core.ingest.thumbnails import downscale_partition
    from imgemb_assets.core.lake import tables
    from imgemb_assets.core.sales.join import join_with_sales

    objects = list(raw.list_objects(prefix))
    manifest = build_manifest(objects, prefix)
    lake.write_partition(tables.RAW_IMAGE_MANIFEST, manifest, prefix)
    downscaled = downscale_partition(raw, manifest, max_workers=2)
    lake.write_partition(tables.DOWNSCALED_IMAGES, downscaled.images, prefix)
    lake.write_partition(tables.REJECTED_IMAGES, downscaled.rejected, prefix)
    joined = join_with_sales(downscaled.images, sales_table, tables.images_with_sales_schema(sales_table.schema))
    lake.write_partition(tables.IMAGES_WITH_SALES, joined, prefix)
    schema = tables.image_embeddings_schema(sales_table.schema)
    embedded = lake.write_partition_stream(tables.IMAGE_EMBEDDINGS, [random_embeddings(joined, schema)], schema, prefix)
    return PrefixWritten(
        prefix,
        listing_fingerprint(objects),
        {
            tables.RAW_IMAGE_MANIFEST: manifest.num_rows,
            tables.DOWNSCALED_IMAGES: downscaled.images.num_rows,
            tables.REJECTED_IMAGES: downscaled.rejected.num_rows,
            tables.IMAGES_WITH_SALES: joined.num_rows,
            tables.IMAGE_EMBEDDINGS: embedded,
        },
    )


def random_embeddings(joined: pa.Table, schema: pa.Schema) -> pa.RecordBatch:
    """The embedding table's rows for the joined rows, with random vectors in place of the model's."""
    from imgemb_assets.core.lake import tables

    vectors = _RNG.standard_normal((joined.num_rows, EMBEDDING_WIDTH), dtype=np.float32)
    embedding = pa.ListArray.from_arrays(
        pa.array(np.arange(0, vectors.size + 1, EMBEDDING_WIDTH, dtype=np.int32)), pa.array(vectors.ravel())
    ).cast(tables.EMBEDDING_TYPE)
    columns = {name: joined.column(name) for name in schema.names if name in joined.column_names}
    columns["embedding"] = embedding
    columns["model_id"] = pa.array([BENCH_MODEL_ID] * joined.num_rows, pa.string())
    return pa.RecordBatch.from_pydict({name: _combined(columns[name]) for name in schema.names}, schema=schema)


def _combined(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


@dataclass(frozen=True)
class TableFootprint:
    table: str
    log_bytes: int
    log_files: int
    data_files: int  # parquet files under the table (live or not yet vacuumed)
    live_files: int  # in the current version


def table_footprints(lake_uri: str) -> list[TableFootprint]:
    from deltalake import DeltaTable

    from imgemb_assets.core.lake import tables

    footprints = []
    for name in tables.ALL_TABLES:
        folder = Path(lake_uri) / name
        log = list((folder / "_delta_log").iterdir())
        footprints.append(
            TableFootprint(
                table=name,
                log_bytes=sum(path.stat().st_size for path in log),
                log_files=len(log),
                data_files=sum(1 for _ in folder.rglob("*.parquet") if "_delta_log" not in _.parts),
                live_files=len(DeltaTable(str(folder)).file_uris()),
            )
        )
    return footprints


# ---------------------------------------------------------------------------- instance


def code_location_env(corpus: Corpus, lake_uri: str, home: Path, pg_url: str | None) -> dict[str, str]:
    """What a user exports to run the location and `imgemb` on this corpus (as the tests' conftest does)."""
    env = {
        "IMGEMB_RAW_IMAGES_URI": corpus.raw_images_uri,
        "IMGEMB_SALES_URI": corpus.sales_uri,
        "IMGEMB_LAKE_URI": lake_uri,
        "IMGEMB_MODEL_WEIGHTS": "random",
        "DAGSTER_HOME": str(home),
    }
    if pg_url is not None:
        env[PG_URL_VARIABLE] = pg_url
    return env


@contextmanager
def instance_home(storage: str, parent: Path) -> Iterator[tuple[Path, str | None]]:
    """(DAGSTER_HOME, PostgreSQL URL or None): the shipped dagster.yaml, its storage on SQLite or PostgreSQL."""
    home = parent / f"home-{storage}"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    shipped = REPO / "dagster.yaml"
    if storage == "sqlite":
        shutil.copy(shipped, home / "dagster.yaml")
        yield home, None
        return
    (home / "dagster.yaml").write_text(yaml.safe_dump(with_postgres_storage(shipped)))
    with running_postgres_server() as server:
        yield home, server.create_database()


def run_timed(command: Sequence[str], env: Mapping[str, str], timeout_s: float) -> tuple[float, str]:
    """Wall seconds of a command run as its own process, as a user runs it; its output."""
    started = time.perf_counter()
    done = subprocess.run(
        list(command), env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=timeout_s
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return seconds, done.stdout


def record_state(
    instance: Any, corpus: Corpus, lake: LakeState, fingerprints: Mapping[str, str], log: Any = print
) -> int:
    """The events the sensors and the assets would have stored for this state, oldest first; how many.

    `raw_images` of every prefix (the discovery sensor's report, with its listing
    fingerprint), `sales_export` and `sales`, then each table of each materialized
    prefix, with the metadata the assets attach. Runless: no run, step or planned
    event, which the real runs (32 prefixes each) would add to the event log too.
    """
    from dagster import AssetMaterialization, MetadataValue

    from imgemb_assets.core.lake import tables
    from imgemb_assets.dagster_wiring.names import (
        LISTING_FINGERPRINT_KEY,
        RAW_IMAGES,
        SALES_EXPORT,
        SALES_FILES_FINGERPRINT_KEY,
    )

    def report(asset: str, partition: str | None, metadata: Mapping[str, Any]) -> None:
        instance.report_runless_asset_event(
            AssetMaterialization(asset_key=asset, partition=partition, metadata=dict(metadata))
        )

    count = 0
    for prefix in corpus.prefixes:
        report(RAW_IMAGES, prefix, {LISTING_FINGERPRINT_KEY: fingerprints[prefix]})
        count += 1
    log(f"instance: {count} raw_images events")
    report(SALES_EXPORT, None, {SALES_FILES_FINGERPRINT_KEY: lake.sales_fingerprint})
    report(
        tables.SALES, None, {"dagster/row_count": lake.sales_rows, SALES_FILES_FINGERPRINT_KEY: lake.sales_fingerprint}
    )
    count += 2
    for table in (tables.RAW_IMAGE_MANIFEST, tables.DOWNSCALED_IMAGES, tables.REJECTED_IMAGES,
                  tables.IMAGES_WITH_SALES, tables.IMAGE_EMBEDDINGS):  # fmt: skip
        uri = MetadataValue.path(str(Path(lake.uri) / table))
        for written in lake.written:
            metadata: dict[str, Any] = {"dagster/row_count": written.rows[table], "table_uri": uri}
            if table == tables.RAW_IMAGE_MANIFEST:
                metadata[LISTING_FINGERPRINT_KEY] = written.fingerprint
            if table == tables.IMAGE_EMBEDDINGS:
                metadata["model_id"] = BENCH_MODEL_ID
            report(table, written.prefix, metadata)
            count += 1
        log(f"instance: {count} events ({table} done)")
    return count


def sensor_origin(sensor_name: str) -> Any:
    """The origin the daemon files a sensor's state and ticks under (the location loaded from this module)."""
    from dagster._core.remote_origin import InProcessCodeLocationOrigin, RemoteInstigatorOrigin, RemoteRepositoryOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    location = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name="imgemb_assets.definitions", working_directory=str(REPO)),
        location_name="imgemb",
    )
    return RemoteInstigatorOrigin(RemoteRepositoryOrigin(location, "__repository__"), sensor_name)


def store_sensor_state(instance: Any, origin: Any, cursor: str) -> None:
    from dagster._core.definitions.run_request import InstigatorType
    from dagster._core.scheduler.instigation import InstigatorState, InstigatorStatus, SensorInstigatorData

    instance.add_instigator_state(
        InstigatorState(origin, InstigatorType.SENSOR, InstigatorStatus.RUNNING, SensorInstigatorData(cursor=cursor))
    )


def write_tick_as_daemon(instance: Any, origin: Any, cursor: str, added: Sequence[str], events: Sequence[Any]) -> None:
    """What the sensor daemon stores after a tick that requested no run (dagster/_daemon/sensor.py).

    Each asset event (one write each), the partitions added, then the tick row,
    created when the tick starts and updated at its end with the cursor in its
    body (a skipped tick, kept 7 days by default), then the sensor's state with
    the cursor again.
    """
    from dagster._core.definitions.run_request import InstigatorType
    from dagster._core.scheduler.instigation import SensorInstigatorData, TickData, TickStatus

    from imgemb_assets.dagster_wiring.names import S3_PREFIX_PARTITIONS_NAME

    state = instance.get_instigator_state(origin.get_id(), origin.get_selector().get_id())
    tick = instance.create_tick(
        TickData(
            instigator_origin_id=origin.get_id(),
            instigator_name=origin.instigator_name,
            instigator_type=InstigatorType.SENSOR,
            status=TickStatus.STARTED,
            timestamp=time.time(),
            selector_id=origin.get_selector().get_id(),
        )
    )
    for event in events:
        instance.report_runless_asset_event(event)
    if added:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, list(added))
    instance.update_tick(tick.with_status(TickStatus.SKIPPED).with_cursor(cursor))
    instance.update_instigator_state(
        state.with_data(SensorInstigatorData(last_tick_timestamp=tick.timestamp, cursor=cursor))
    )


# ---------------------------------------------------------------------------- UI

# The query the UI's asset page sends for its partition health bar (dagster-webserver 1.13's
# bundled `PartitionHealthQuery`), and the one the asset catalog sends for its counts.
PARTITION_HEALTH_QUERY: Final = """
query PartitionHealthQuery($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode {
      id
      partitionKeysByDimension { name type partitionKeys }
      assetPartitionStatuses {
        ... on TimePartitionStatuses { ranges { status startTime endTime startKey endKey } }
        ... on DefaultPartitionStatuses { materializedPartitions materializingPartitions failedPartitions }
        ... on MultiPartitionStatuses { primaryDimensionName }
      }
    }
  }
}
"""
PARTITION_STATS_QUERY: Final = """
query AssetPartitionStats($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode { id partitionStats { numMaterialized numMaterializing numFailed numPartitions } }
  }
}
"""


@dataclass(frozen=True)
class Webserver:
    url: str
    seconds_to_ready: float


@contextmanager
def running_webserver(env: Mapping[str, str], log_path: Path, timeout_s: float = 300.0) -> Iterator[Webserver]:
    """`dagster-webserver -m imgemb_assets.definitions` on a free port, until its location answers GraphQL."""
    from imgemb_support.moto_server import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with log_path.open("w") as out:
        process = subprocess.Popen(
            [str(BIN / "dagster-webserver"), "-m", "imgemb_assets.definitions", "-h", "127.0.0.1", "-p", str(port)],
            env={**os.environ, **env}, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"dagster-webserver exited ({process.returncode}); see {log_path}")
                if time.perf_counter() - started > timeout_s:
                    raise RuntimeError(
                        f"dagster-webserver did not load the location in {timeout_s:.0f} s; see {log_path}"
                    )
                try:
                    answer = graphql(url, PARTITION_STATS_QUERY, {"assetKey": {"path": ["raw_images"]}}, timeout_s=30)
                    if answer.get("data", {}).get("assetNodeOrError", {}).get("id"):
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(0.5)
            yield Webserver(url, time.perf_counter() - started)
        finally:
            os.killpg(process.pid, signal.SIGTERM)  # the server and the code server it started
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def graphql(url: str, query: str, variables: Mapping[str, Any], timeout_s: float = 600) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": dict(variables)}).encode()
    request = urllib.request.Request(f"{url}/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        answer = json.loads(response.read())
    if answer.get("errors"):
        raise RuntimeError(f"GraphQL errors: {answer['errors']}")
    return answer


def partition_counts(answer: Mapping[str, Any]) -> str:
    """What a PartitionHealthQuery answer says: partitions, materialized ones, bytes."""
    node = answer["data"]["assetNodeOrError"]
    keys = sum(len(d["partitionKeys"]) for d in node["partitionKeysByDimension"])
    materialized = len(node["assetPartitionStatuses"].get("materializedPartitions", []))
    return f"{keys} partitions, {materialized} materialized, {len(json.dumps(answer)) / 1e6:.2f} MB answer"
