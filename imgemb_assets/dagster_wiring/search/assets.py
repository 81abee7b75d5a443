"""The search index and the near-duplicate table, kept in step with `image_embeddings` by one step.

`image_search_index` is one index per model_id under `<lake>/_search_index/`
(`core/search/index/`), updated a partition at a time (`core/search/refresh.py`).
`near_duplicates` holds, for each partition that changed, its image pairs above
the similarity resource's threshold against the whole index of the same model;
its check warns when a partition's share of images with a near duplicate jumps.
Both are unpartitioned in Dagster (a partition's near duplicates depend on every
other partition) and follow any change of the embedding table.
"""

# No `from __future__ import annotations` here: Dagster inspects the type of `context`.
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from imgemb_assets.core.embedding.model_settings import model_id_has_random_weights
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.dagster_wiring.location.automation import FOLLOWS_UPSTREAM
from imgemb_assets.dagster_wiring.location.resources import StorageResource
from imgemb_assets.dagster_wiring.location.retries import STEP_RETRY_POLICY, permanent_failures
from imgemb_assets.dagster_wiring.location.table_metadata import table_metadata
from imgemb_assets.dagster_wiring.names import NEAR_DUPLICATE_SHARE_CHECK, SEARCH_INDEX, SEARCH_INDEX_POOL
from imgemb_assets.dagster_wiring.search.resources import SimilaritySettings

if TYPE_CHECKING:  # usearch is imported by this step only
    from imgemb_assets.core.search.refresh import IndexRefresh, ModelRefresh

# Earlier partitions a partition's near-duplicate share is compared with.
_PREVIOUS_PARTITIONS: Final = 7
# Images of the changed partitions shown beside their nearest neighbours.
_SHEET_QUERIES: Final = 6
_SHEET_NEIGHBOURS: Final = 5
_RANDOM_PAIRS_WARNING: Final = (
    "{} has random, untrained weights: its vectors sit close to each other whatever the images show, "
    "so its near-duplicate pairs mean nothing"
)


def build_similarity_assets(model_code_version: str) -> dg.AssetsDefinition:
    @dg.multi_asset(
        name="update_search_index",
        specs=[
            dg.AssetSpec(
                SEARCH_INDEX,
                deps=[tables.IMAGE_EMBEDDINGS],
                automation_condition=FOLLOWS_UPSTREAM,
                code_version=model_code_version,
                kinds={"usearch"},
                group_name="search",
                description="One similar-image index per model_id under <lake>/_search_index/ (exact search below "
                "50,000 vectors, usearch HNSW above), updated for the partitions of image_embeddings that changed. "
                "Query it with `imgemb similar`.",
            ),
            dg.AssetSpec(
                tables.NEAR_DUPLICATES,
                deps=[SEARCH_INDEX],
                automation_condition=FOLLOWS_UPSTREAM,
                code_version=model_code_version,
                kinds={"delta"},
                group_name="search",
                description="Image pairs whose embeddings (same model) have a cosine similarity of at least the "
                "similarity resource's near_duplicate_threshold, within and across partitions.",
            ),
        ],
        check_specs=[
            dg.AssetCheckSpec(
                NEAR_DUPLICATE_SHARE_CHECK,
                asset=tables.NEAR_DUPLICATES,
                description="Warns when a changed partition's share of images with a near duplicate is more than "
                "max_near_duplicate_share_jump_points above the median of the previous partitions'.",
            )
        ],
        retry_policy=STEP_RETRY_POLICY,
        # One refresh at a time queues runs instead of letting them race: the index itself
        # refuses a stale commit (compare-and-swap), and a refresh that lost one starts over.
        pool=SEARCH_INDEX_POOL,
    )
    def update_search_index(
        context: dg.AssetExecutionContext, storage: StorageResource, similarity: SimilaritySettings
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        from imgemb_assets.core.search.refresh import refresh_search_indexes

        lake = storage.lake()
        with permanent_failures():  # a bad setting or S3 denying the lake: one line, not retried
            try:
                refresh = refresh_search_indexes(lake, threshold=similarity.near_duplicate_threshold)
            except Exception as exc:  # the index's files go through pyarrow and boto3, each wording a 403 its way
                refusal = lake.denied_access_refusal(exc)
                if refusal is None:
                    raise
                raise refusal from exc
        found, pairs = refresh.near_duplicates, refresh.pairs_written
        for rebuilt, reason in refresh.rebuilt.items():
            context.log.warning(f"the search index of {rebuilt} was rebuilt from {tables.IMAGE_EMBEDDINGS}: {reason}")
        context.log.info(
            f"{len(refresh.partitions_read)} partitions read, {len(refresh.partitions_removed)} removed, "
            f"{pairs} near-duplicate pairs written, in {refresh.seconds:.1f} s"
        )
        yield dg.MaterializeResult(asset_key=SEARCH_INDEX, metadata=_index_metadata(lake, refresh))
        # Read once, for the row count and the check; absent while no partition was ever embedded.
        all_pairs = (
            lake.read(tables.NEAR_DUPLICATES) if lake.exists(tables.NEAR_DUPLICATES)
            else tables.NEAR_DUPLICATES_SCHEMA.empty_table()
        )  # fmt: skip
        random_models = sorted(model_id for model_id in refresh.models if model_id_has_random_weights(model_id))
        yield dg.MaterializeResult(
            asset_key=tables.NEAR_DUPLICATES,
            metadata=table_metadata(lake, tables.NEAR_DUPLICATES, all_pairs.num_rows, tables.NEAR_DUPLICATES_SCHEMA,
                                    pairs_written=pairs, threshold=similarity.near_duplicate_threshold,
                                    **({"warning": _RANDOM_PAIRS_WARNING.format(", ".join(random_models))}
                                       if random_models else {})),
        )  # fmt: skip
        yield _share_check(all_pairs, refresh, found, similarity)

    return update_search_index


def _index_metadata(lake: Lake, refresh: "IndexRefresh") -> dict[str, Any]:
    """The largest model's numbers at the top (the one a person queries), every model in a table."""
    from imgemb_assets.core.search.index.metrics import index_metadata
    from imgemb_assets.core.search.index.persistence import stored_index_bytes

    metadata: dict[str, Any] = {
        "partitions_read": len(refresh.partitions_read),
        "partitions_removed": len(refresh.partitions_removed),
        "refresh_seconds": round(refresh.seconds, 3),
        "refresh_attempts": refresh.attempts,
        "models": len(refresh.models),
        "indexes_rebuilt": dg.MetadataValue.json(refresh.rebuilt),
    }
    if not refresh.models:  # nothing embedded yet
        return metadata | {"vectors_indexed": 0}
    stored = {model_id: stored_index_bytes(lake, model_id) for model_id in refresh.models}
    rows = ["| model_id | vectors | backend | update s | stored bytes |", "| --- | --- | --- | --- | --- |"]
    for model_id, model in refresh.models.items():
        rows.append(f"| {model_id} | {len(model.index)} | {model.index.backend} | {model.update.seconds:.3f} | "
                    f"{stored[model_id]} |")  # fmt: skip
    main_id, main = max(refresh.models.items(), key=lambda item: len(item[1].index))
    sheet = _neighbours_sheet(lake, main)
    return (
        metadata
        | index_metadata(main.index)
        | {
            "vectors_updated": main.update.vectors_added,
            "index_update_seconds": round(main.update.seconds, 3),
            "stored_bytes": stored[main_id],
            "indexes": dg.MetadataValue.md("\n".join(rows)),
            "neighbours_sheet": dg.MetadataValue.md(sheet),
            "neighbours_sheet_bytes": len(sheet.encode()),
        }
    )


def _neighbours_sheet(lake: Lake, model: "ModelRefresh") -> str:
    """A few images of the changed partitions beside their nearest neighbours, as a person checks an index."""
    from imgemb_assets.core.imaging.contact_sheet import Neighbour, NeighbourRow, neighbours_sheet

    candidates = [
        (prefix, image_id) for prefix, vectors in model.with_vectors.items() for image_id in vectors.image_ids
    ]
    queries = random.Random(0).sample(candidates, min(_SHEET_QUERIES, len(candidates)))
    found = {query: model.index.neighbours_of(query[1], _SHEET_NEIGHBOURS, prefix=query[0]) for query in queries}
    wanted = set(queries) | {(hit.prefix, hit.image_id) for hits in found.values() for hit in hits}
    jpegs = _thumbnails(lake, wanted)
    rows = [
        NeighbourRow(image_id, jpegs.get((prefix, image_id), b""), [
            Neighbour(hit.image_id, jpegs.get((hit.prefix, hit.image_id), b""), hit.similarity) for hit in hits
        ])
        for (prefix, image_id), hits in found.items()
    ]  # fmt: skip
    return neighbours_sheet(rows) if rows else "No partition changed: no neighbours to show."


def _thumbnails(lake: Lake, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
    found: dict[tuple[str, str], bytes] = {}
    for prefix in sorted({prefix for prefix, _ in wanted}):
        rows = lake.read(tables.DOWNSCALED_IMAGES, prefix, columns=["image_id", "image_jpeg"]).to_pylist()
        found |= {(prefix, row["image_id"]): row["image_jpeg"] for row in rows if (prefix, row["image_id"]) in wanted}
    return found


def _share_check(
    table: pa.Table, refresh: "IndexRefresh", found: Mapping[str, Mapping[str, Any]], similarity: SimilaritySettings
) -> dg.AssetCheckResult:
    """`table`: every near-duplicate row, all models."""
    from imgemb_assets.core.search.near_duplicates import near_duplicate_share_check, near_duplicate_shares

    jumped: list[str] = []
    checked = 0
    for model_id, model in refresh.models.items():
        of_model = table.filter(pc.equal(table.column("model_id"), model_id))
        shares = near_duplicate_shares(of_model, model.index.partition_counts())
        for prefix, result in ((p, by_model[model_id]) for p, by_model in found.items() if model_id in by_model):
            outcome = near_duplicate_share_check(result, _previous(shares, prefix), similarity.share_jump_rule())
            checked += 1
            if not outcome.passed:
                jumped.append(f"{prefix} ({outcome.description})")
    return dg.AssetCheckResult(
        check_name=NEAR_DUPLICATE_SHARE_CHECK,
        asset_key=tables.NEAR_DUPLICATES,
        passed=not jumped,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{len(jumped)} of {checked} changed partitions jumped"
        if jumped
        else f"{checked} changed partitions checked",
        metadata={"partitions_checked": checked, "jumped": dg.MetadataValue.json(jumped[:20])},
    )


def _previous(shares: Mapping[str, float], prefix: str) -> Sequence[float]:
    earlier = sorted(key for key in shares if key < prefix)[-_PREVIOUS_PARTITIONS:]
    return [shares[key] for key in earlier]
