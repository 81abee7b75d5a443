"""Staged vectors of a partition being embedded: written one file per model batch, atomically, read back
as reusable vectors by a rerun (only under their own model_id), unreadable files ignored and deleted,
the folder removed after the commit; on a local lake and on S3 (moto)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from imgemb_assets.core.embedding.inference import embed_thumbnails
from imgemb_assets.core.embedding.model_settings import EmbeddingSettings
from imgemb_assets.core.embedding.partition import EmbeddingRun, SharedModel, embed_partition_batches
from imgemb_assets.core.embedding.progress import Progress
from imgemb_assets.core.embedding.staging import STAGED_SCHEMA, PartitionStaging, staging_root_uri
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_support.counting_filesystem import CountingHandler
from imgemb_support.rows import EMBEDDINGS_SCHEMA, JOINED_SCHEMA, random_thumbnails

PREFIX = "2026-11-01"
# resnet18 (512 wide), batches of 2: cheap forward passes, several model batches per partition.
RESNET18 = EmbeddingSettings(weights="random", model="resnet18", device="cpu", precision="fp32", batch_size=2)
OTHER_WEIGHTS = EmbeddingSettings(weights="random:1", model="resnet18", device="cpu", precision="fp32", batch_size=2)
ROWS = 6


@pytest.fixture(scope="module")
def thumbnails() -> list[bytes]:
    return random_thumbnails(ROWS, seed=7, size=(90, 120))


def _ids(rows: range | list[int]) -> list[str]:
    return [f"img_{row:04d}" for row in rows]


def _etags(rows: range | list[int]) -> list[str]:
    return [f"etag-img_{row:04d}" for row in rows]


def _joined(jpegs: list[bytes]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(
        [
            {"image_id": id_, tables.PARTITION_COLUMN: PREFIX, "etag": etag, "width": 224, "height": 224,
             "image_jpeg": jpeg, "sales": 1.0}
            for id_, etag, jpeg in zip(_ids(range(len(jpegs))), _etags(range(len(jpegs))), jpegs)
        ],
        schema=JOINED_SCHEMA,
    )  # fmt: skip


def _vectors(rows: int, width: int = 512, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


def _embed(
    thumbnails: list[bytes], shared: SharedModel, staging: PartitionStaging, progress: Progress | None = None
) -> tuple[EmbeddingRun, pa.Table]:
    run = EmbeddingRun()
    batches = embed_partition_batches(
        [_joined(thumbnails)], None, shared, EMBEDDINGS_SCHEMA, run, staging=staging, progress=progress
    )
    return run, pa.Table.from_batches(list(batches), EMBEDDINGS_SCHEMA)


def _rows_of(staging: PartitionStaging) -> pa.Table:
    return pa.Table.from_batches(list(staging.read()), STAGED_SCHEMA)


def test_staged_vectors_are_read_back_and_reused_without_the_model(tmp_path: Path, thumbnails: list[bytes]) -> None:
    lake = Lake(str(tmp_path / "lake"))
    shared = SharedModel(RESNET18)
    staged = _vectors(ROWS)
    writer = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, shared.model_id)
    writer.write(_ids(range(4)), _etags(range(4)), staged[:4])
    writer.write(_ids(range(4, ROWS)), _etags(range(4, ROWS)), staged[4:])
    assert writer.rows_staged == ROWS and len(writer.staged_files()) == 2

    rerun = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, shared.model_id)
    lines: list[str] = []
    progress = Progress("p", ROWS, lines.append, interval_s=0.0)
    run, out = _embed(thumbnails, shared, rerun, progress)
    assert (run.images_embedded, run.images_reused, run.images_resumed, run.model) == (0, ROWS, ROWS, None)
    assert rerun.rows_found == ROWS and rerun.rows_staged == 0
    np.testing.assert_array_equal(np.asarray(out.column("embedding").to_pylist(), np.float32), staged)
    assert progress.done == ROWS and lines


def test_each_model_batch_is_staged_and_a_rerun_embeds_only_what_was_not(
    tmp_path: Path, thumbnails: list[bytes]
) -> None:
    lake = Lake(str(tmp_path / "lake"))
    shared = SharedModel(RESNET18)
    first = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, shared.model_id)
    run, out = _embed(thumbnails, shared, first)
    assert run.images_embedded == ROWS and first.rows_staged == ROWS
    assert len(first.staged_files()) == ROWS // RESNET18.batch_size  # one file per model batch
    assert not any(path.name.startswith(".") for path in Path(first.uri).iterdir())  # no scratch file left

    # Only the first two batches survive (as if killed during the third): the rerun embeds the third alone.
    for name in first.staged_files()[2:]:
        (Path(first.uri) / name).unlink()
    rerun = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, shared.model_id)
    again, out_again = _embed(thumbnails, shared, rerun)
    assert (again.images_embedded, again.images_resumed) == (RESNET18.batch_size, ROWS - RESNET18.batch_size)
    assert rerun.rows_staged == RESNET18.batch_size
    assert out_again.column("embedding").equals(out.column("embedding"))
    expected = embed_thumbnails(shared.get(), thumbnails)
    np.testing.assert_allclose(np.asarray(out.column("embedding").to_pylist(), np.float32), expected, atol=1e-5)


def test_a_truncated_or_foreign_staged_file_is_ignored_and_deleted(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    staging = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, "m1")
    staging.write(_ids(range(3)), _etags(range(3)), _vectors(3))
    staging.write(_ids(range(3, 6)), _etags(range(3, 6)), _vectors(3, seed=1))
    good, truncated = (Path(staging.uri) / name for name in staging.staged_files())
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (Path(staging.uri) / "zz-garbage.parquet").write_bytes(b"not parquet at all")
    pq.write_table(pa.table({"something": [1, 2]}), Path(staging.uri) / "zz-other-shape.parquet")
    (Path(staging.uri) / ".half-written.parquet.tmp").write_bytes(b"PAR1")  # a killed local write's scratch
    warnings: list[str] = []

    rerun = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, "m1", warn=warnings.append)
    rows = _rows_of(rerun)
    assert rows.column("image_id").to_pylist() == _ids(range(3))
    assert (rerun.rows_found, rerun.files_ignored) == (3, 3)
    assert len(warnings) == 3 and all("ignored unreadable staged vectors" in line for line in warnings)
    assert rerun.staged_files() == [good.name]  # the unreadable ones were deleted


def test_a_damaged_page_is_caught_by_its_checksum(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    staging = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, "m1")
    staging.write(_ids(range(4)), _etags(range(4)), _vectors(4))
    (path,) = (Path(staging.uri) / name for name in staging.staged_files())
    body = bytearray(path.read_bytes())
    body[len(body) // 2] ^= 0xFF  # inside the vectors' data page; the footer is intact
    path.write_bytes(bytes(body))
    rerun = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, "m1")
    assert _rows_of(rerun).num_rows == 0 and rerun.files_ignored == 1


def test_vectors_staged_under_another_model_are_never_reused(tmp_path: Path, thumbnails: list[bytes]) -> None:
    lake = Lake(str(tmp_path / "lake"))
    shared, other = SharedModel(RESNET18), SharedModel(OTHER_WEIGHTS)
    PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, other.model_id).write(
        _ids(range(ROWS)), _etags(range(ROWS)), _vectors(ROWS)
    )
    # Even a file of the other model's rows inside this model's folder (folder names are lossy) is not reused.
    mine = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, shared.model_id)
    foreign = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, other.model_id)
    foreign._path = mine._path
    foreign.write(_ids(range(ROWS)), _etags(range(ROWS)), _vectors(ROWS))
    run, _ = _embed(thumbnails, shared, mine)
    assert (run.images_embedded, run.images_resumed) == (ROWS, 0)


def test_a_changed_image_is_not_taken_from_staging(tmp_path: Path, thumbnails: list[bytes]) -> None:
    lake = Lake(str(tmp_path / "lake"))
    shared = SharedModel(RESNET18)
    staging = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, shared.model_id)
    etags = _etags(range(ROWS))
    etags[0] = "etag-of-the-old-content"
    staging.write(_ids(range(ROWS)), etags, _vectors(ROWS))
    run, _ = _embed(thumbnails, shared, PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, shared.model_id))
    assert (run.images_embedded, run.images_resumed) == (1, ROWS - 1)


def test_clear_removes_the_partition_and_model_folder_only(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    this = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, "m1")
    other_model = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, "m2")
    other_prefix = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, "2026-11-02", "m1")
    for staging in (this, other_model, other_prefix):
        staging.write(_ids(range(2)), _etags(range(2)), _vectors(2))
    this.clear()
    assert not Path(this.uri).exists()
    assert other_model.staged_files() and other_prefix.staged_files()
    other_model.clear()
    other_prefix.clear()
    assert not Path(staging_root_uri(lake)).exists()  # empty prefix, table and staging folders go too
    this.clear()  # nothing left: no error


def test_a_failed_staging_write_warns_once_and_is_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    warnings: list[str] = []
    lake = Lake(str(tmp_path / "lake"))
    staging = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, "m1", warn=warnings.append)

    def refuse(name: str, table: pa.Table) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(staging, "_write_file", refuse)
    staging.write(_ids(range(2)), _etags(range(2)), _vectors(2))
    staging.write(_ids(range(2)), _etags(range(2)), _vectors(2))
    assert staging.write_failures == 2 and staging.rows_staged == 0
    assert len(warnings) == 1 and "disk full" in warnings[0]


def test_staging_on_s3(bucket: str) -> None:
    lake = Lake(f"s3://{bucket}/delta", storage_options=S3Settings().delta_storage_options())
    staging = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, "torchvision/resnet18/random-seed0/fp32")
    staging.write(_ids(range(3)), _etags(range(3)), _vectors(3))
    staging.write(_ids(range(3, 5)), _etags(range(3, 5)), _vectors(2, seed=1))
    client = S3Settings().client()
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix="delta/_staging/")["Contents"]]
    assert len(keys) == 2
    assert all(key.startswith(f"delta/_staging/image_embeddings/{PREFIX}/") for key in keys)
    client.put_object(Bucket=bucket, Key=keys[0].rsplit("/", 1)[0] + "/zz-broken.parquet", Body=b"PAR1 truncated")
    rerun = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, "torchvision/resnet18/random-seed0/fp32")
    assert _rows_of(rerun).column("image_id").to_pylist() == _ids(range(5))
    assert rerun.files_ignored == 1
    rerun.clear()
    left = client.list_objects_v2(Bucket=bucket, Prefix="delta/_staging/").get("Contents", [])
    # pyarrow leaves an empty marker object for the folder above the one it deleted; no file is left
    assert all(item["Key"].endswith("/") and item["Size"] == 0 for item in left)


class _CallCounting(CountingHandler):
    def __init__(self, inner: pafs.FileSystem) -> None:
        super().__init__(inner)
        self.calls: list[str] = []

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        self.calls.append("get_file_info")
        return super().get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        self.calls.append("list")
        return super().get_file_info_selector(selector)

    def delete_dir(self, path: str) -> None:
        self.calls.append("delete_dir")
        super().delete_dir(path)


def _counted(staging: PartitionStaging) -> _CallCounting:
    handler = _CallCounting(pafs.LocalFileSystem())
    staging._fs = pafs.PyFileSystem(handler)
    return handler


def test_a_partition_with_nothing_staged_costs_one_listing(tmp_path: Path) -> None:
    staging = PartitionStaging(Lake(str(tmp_path / "lake")), tables.IMAGE_EMBEDDINGS, PREFIX, "m1")
    handler = _counted(staging)
    assert list(staging.read()) == []
    staging.clear()
    assert handler.calls == ["list"]  # no second request to clear a folder that holds nothing


def test_a_killed_local_writes_scratch_file_is_cleared_after_the_commit(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    staging = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, "m1")
    Path(staging.uri).mkdir(parents=True)
    (Path(staging.uri) / ".abc-000000.parquet.tmp").write_bytes(b"PAR1")  # killed before its rename
    assert list(staging.read()) == [] and staging.files_ignored == 0
    staging.clear()
    assert not Path(staging_root_uri(lake)).exists()


def test_a_staged_file_that_could_not_be_fetched_is_skipped_but_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake = Lake(str(tmp_path / "lake"))
    PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, "m1").write(_ids(range(2)), _etags(range(2)), _vectors(2))
    warnings: list[str] = []
    rerun = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, "m1", warn=warnings.append)

    def connection_reset(name: str) -> pa.Buffer:
        raise OSError("connection reset by peer")

    monkeypatch.setattr(rerun, "_read_file", connection_reset)
    assert _rows_of(rerun).num_rows == 0
    assert rerun.files_ignored == 0 and len(rerun.staged_files()) == 1  # a later rerun may read it
    assert len(warnings) == 1 and "connection reset" in warnings[0]
