"""The embedding step's work on one prefix: stream the joined rows through the model (reusing stored
vectors), write the partition in one commit, and report its metadata and checks.

A big partition is visible and resumable: the step logs its progress (done/total,
images/s, ETA) at least every `EMBEDDING_PROGRESS_INTERVAL_S`, and stages every model
batch's vectors under the lake (`core.embedding.staging`) until the partition's commit
succeeds, so a step killed mid-partition resumes where it was on the rerun.
"""

# No `from __future__ import annotations`: kept like assets.py, whose context types Dagster inspects.
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import dagster as dg

from imgemb_assets.core.embedding.drift import (
    MOMENTS_BATCH_ROWS,
    EmbeddingMoments,
    embedding_drift,
    moments_of_batches,
    previous_partition,
)
from imgemb_assets.core.embedding.progress import PROGRESS_INTERVAL_S, Progress
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.commits import all_of
from imgemb_assets.core.lake.errors import PartitionRemovedError
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.quality.checks import CheckOutcome, embedding_values
from imgemb_assets.dagster_wiring.location.partition_steps import AssetReport, CheckReport
from imgemb_assets.dagster_wiring.location.partitions import still_registered
from imgemb_assets.dagster_wiring.location.placement import worker_identity
from imgemb_assets.dagster_wiring.location.resources import QualityThresholds
from imgemb_assets.dagster_wiring.location.table_metadata import table_metadata
from imgemb_assets.dagster_wiring.names import EMBEDDING_DRIFT_CHECK, EMBEDDING_VALUES_CHECK, PROGRESS_METADATA_PREFIX

if TYPE_CHECKING:  # torch is imported by the embedding step only
    from imgemb_assets.core.embedding.partition import SharedModel

# Joined rows per streamed batch (thumbnails are ~15-30 KB each).
_EMBEDDING_READ_ROWS: Final = 2048
# Stored vectors per streamed batch (8 KiB each).
_STORED_VECTOR_READ_ROWS: Final = 4096
# A progress line at least this often while a prefix is embedded (read at each call: tests shorten it).
EMBEDDING_PROGRESS_INTERVAL_S: float = PROGRESS_INTERVAL_S
# image_ids per batch when counting the joined rows before streaming them.
_COUNT_READ_ROWS: Final = 65_536


def embed_prefix(
    context: dg.AssetExecutionContext,
    lake: Lake,
    prefix: str,
    model: "SharedModel",
    quality: QualityThresholds,
    progress_interval_s: float | None = None,
) -> Sequence[AssetReport]:
    from imgemb_assets.core.embedding.allocator import release_free_heap
    from imgemb_assets.core.embedding.partition import EmbeddingRun, embed_partition_batches
    from imgemb_assets.core.embedding.staging import PartitionStaging

    # The joined rows stream through in batches and are written in one commit, unless the
    # join was rewritten meanwhile (a sales refresh): then the retry embeds the new rows.
    joined_unchanged = all_of(
        lake.unchanged_since(tables.IMAGES_WITH_SALES, prefix), still_registered(context.instance, prefix)
    )
    joined = lake.read_batches(tables.IMAGES_WITH_SALES, prefix, batch_rows=_EMBEDDING_READ_ROWS)
    # Streamed: the step spools the reusable vectors and looks them up a batch at a time.
    previous = (
        lake.read_batches(
            tables.IMAGE_EMBEDDINGS,
            prefix,
            columns=["image_id", "etag", "model_id", "embedding"],
            batch_rows=_STORED_VECTOR_READ_ROWS,
        )
        if lake.exists(tables.IMAGE_EMBEDDINGS)
        else None
    )
    schema = tables.image_embeddings_schema(tables.sales_schema_of_joined(joined.schema))
    run = EmbeddingRun()
    interval_s = EMBEDDING_PROGRESS_INTERVAL_S if progress_interval_s is None else progress_interval_s
    progress = Progress(
        f"{prefix}: embedding",
        joined_row_count(lake, prefix),
        context.log.info,
        interval_s,
        metadata_prefix=PROGRESS_METADATA_PREFIX,
    )
    # Vectors an interrupted attempt staged are reused; this attempt's are staged until the commit.
    staging = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, prefix, model.model_id, warn=context.log.warning)
    try:
        rows = lake.write_partition_stream(
            tables.IMAGE_EMBEDDINGS,
            embed_partition_batches(joined, previous, model, schema, run, staging=staging, progress=progress),
            schema,
            prefix,
            joined_unchanged,
        )
    except PartitionRemovedError:
        staging.clear()  # no rerun will resume a removed prefix: its staged vectors would be left for good
        raise
    # Committed: the partition holds every vector now, so the staged ones can go.
    staging.clear()
    progress.finish()
    release_free_heap()  # the step's memory stays that of one prefix, however many the run holds
    if run.images_resumed:
        context.log.info(
            f"{prefix}: resumed an interrupted attempt: {run.images_resumed} staged vectors reused, "
            f"{run.images_embedded} images through the model"
        )
    if run.model is not None and run.model.is_random:
        context.log.warning(f"{prefix}: embedded with {run.model.weights_description}")
    metadata = table_metadata(
        lake,
        tables.IMAGE_EMBEDDINGS,
        rows,
        schema,
        model_id=run.model_id,
        images_embedded=run.images_embedded,
        images_reused=run.images_reused,
        # stored vectors that were NaN, infinite or of another width: recomputed, never reused
        stored_vectors_refused=run.stored_refused,
        # of images_reused, those staged by an earlier attempt that was interrupted (killed, failed to commit)
        images_resumed=run.images_resumed,
        images_staged=staging.rows_staged,
        staged_files_ignored=staging.files_ignored,  # unreadable (truncated, corrupt): deleted, their images recomputed
        embedding_seconds=round(run.seconds, 3),
        staging_seconds=round(run.staging_seconds, 3),
        worker=worker_identity(),  # the Celery worker, ECS task or pod that ran the step
        images_per_second=round(run.images_per_second, 2),
        **run.model_metadata(),
        **progress.metadata(),  # progress_done / _total / _seconds / _images_per_second: every row, embedded or reused
    )
    checks = [
        CheckReport(
            EMBEDDING_VALUES_CHECK,
            embedding_values(run.widths, run.width, run.non_finite_rows, run.rows),
        ),
        CheckReport(
            EMBEDDING_DRIFT_CHECK,
            drift_against_previous_partition(lake, prefix, run.model_id, run.moments, quality),
            dg.AssetCheckSeverity.WARN,
        ),
    ]
    return [AssetReport(tables.IMAGE_EMBEDDINGS, metadata, checks)]


def joined_row_count(lake: Lake, prefix: str) -> int:
    """The rows of the prefix's joined table: the embedding's total, counted before streaming.

    Reads only the image_id column of the partition (a few MB for 100,000 rows), not the thumbnails.
    """
    reader = lake.read_batches(tables.IMAGES_WITH_SALES, prefix, columns=["image_id"], batch_rows=_COUNT_READ_ROWS)
    return sum(batch.num_rows for batch in reader)


def drift_against_previous_partition(
    lake: Lake, prefix: str, model_id: str, moments: EmbeddingMoments, quality: QualityThresholds
) -> CheckOutcome:
    previous_key = previous_partition(lake.partition_keys(tables.IMAGE_EMBEDDINGS), prefix)
    previous = (
        moments_of_batches(
            lake.read_batches(
                tables.IMAGE_EMBEDDINGS, previous_key, columns=["model_id", "embedding"], batch_rows=MOMENTS_BATCH_ROWS
            ),
            model_id,
        )
        if previous_key is not None
        else None
    )
    return embedding_drift(moments, previous, previous_key, quality.drift_thresholds())
