"""Zero-shot agreement in embedding_evaluation, through Dagster: a CLIP's rows are scored against its own text tower.

Random-initialised CLIP weights (no download), so the scores are noise and must say so.
The ResNet side (null zero-shot columns, no zero-shot row) is checked in test_graph.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pytest
from dagster import AssetKey, DagsterInstance, ExecuteInProcessResult
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from imgemb_assets.core.embedding import text_encoder
from imgemb_assets.core.evaluation.zero_shot_agreement import NOISE_LABEL
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import PREFIX_JOB_NAME, SALES_JOB_NAME
from imgemb_assets.definitions import build_definitions
from imgemb_support.location import code_location_instance

defs = build_definitions(LocationSettings())
CLIP_RANDOM = "open_clip/clip_vit_b_32/random-seed0/fp32"


def _model_config(weights: str) -> dict[str, Any]:
    return {
        "resources": {"embedding_model": {"config": {"model": "clip_vit_b_32", "weights": weights, "device": "cpu"}}}
    }


def _evaluation_metadata(result: ExecuteInProcessResult) -> dict[str | None, dict[str, Any]]:
    """The embedding_evaluation materialization's metadata, per partition."""
    out = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        if materialization.asset_key.to_user_string() == tables.EMBEDDING_EVALUATION:
            out[materialization.partition] = {key: value.value for key, value in materialization.metadata.items()}
    return out


@pytest.fixture
def instance(
    small_dataset: SampleDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DagsterInstance]:
    with code_location_instance(small_dataset, tmp_path / "lake", monkeypatch) as instance:
        assert defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=instance).success
        yield instance


@pytest.fixture
def text_tower_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The model_id of every text tower built in this process (the runs execute in it)."""
    built: list[str] = []
    load: Callable[..., text_encoder.TextEncoder] = text_encoder.load_text_encoder

    def counted(*args: Any, **kwargs: Any) -> text_encoder.TextEncoder:
        encoder = load(*args, **kwargs)
        built.append(encoder.model_id)
        return encoder

    monkeypatch.setattr(text_encoder, "load_text_encoder", counted)
    return built


def test_random_clip_rows_get_zero_shot_agreement_labelled_noise_with_one_text_tower_per_step(
    instance: DagsterInstance, small_dataset: SampleDataset, tmp_path: Path, text_tower_builds: list[str]
) -> None:
    prefixes = small_dataset.prefixes
    # Both partitions in one run, as a backfill chunk runs them: one evaluation step over two prefixes.
    result = defs.resolve_job_def(PREFIX_JOB_NAME).execute_in_process(
        instance=instance,
        run_config=_model_config("random"),
        tags={ASSET_PARTITION_RANGE_START_TAG: prefixes[0], ASSET_PARTITION_RANGE_END_TAG: prefixes[-1]},
    )
    assert result.success
    assert text_tower_builds == [CLIP_RANDOM], "the prompts are encoded once per step, not once per prefix"

    lake = Lake(str(tmp_path / "lake"))
    # Every partition is scored against the classes of the whole sales table, not its own labels.
    classes = len(pc.unique(lake.read(tables.SALES, columns=["category"]).column("category")))
    assert classes == 5
    metadata = _evaluation_metadata(result)
    for prefix in prefixes:
        (row,) = lake.read(tables.EMBEDDING_EVALUATION, prefix).to_pylist()
        assert row["model_id"] == CLIP_RANDOM and row["weights_are_random"]
        assert row["zero_shot_classes"] == classes
        assert 0.0 <= row["zero_shot_agreement"] <= 1.0
        # Chance: sum over classes of (share predicted) x (share labelled), so at least 1 / images and at most 1.
        assert 0.0 < row["zero_shot_agreement_chance"] <= 1.0
        shown = metadata[prefix]
        assert shown["zero_shot_agreement"] == round(row["zero_shot_agreement"], 4)
        assert shown["zero_shot_agreement_chance"] == round(row["zero_shot_agreement_chance"], 4)
        assert shown["zero_shot_classes"] == classes and shown["zero_shot_caveat"] == NOISE_LABEL
        assert "zero_shot_not_scored" not in shown
        # Beside kNN agreement in the summary (n/a: 7 vectors are not more than k), with its chance and the caveat.
        summary_lines = str(shown["summary"]).splitlines()
        knn = next(i for i, line in enumerate(summary_lines) if line.startswith("| kNN agreement"))
        assert summary_lines[knn + 1].startswith(f"| zero-shot agreement, {classes} prompts |")
        assert f"(chance {row['zero_shot_agreement_chance']:.3f}) ({NOISE_LABEL})" in summary_lines[knn + 1]


def test_a_partition_embedded_by_other_weights_is_not_scored_and_says_why(
    instance: DagsterInstance, small_dataset: SampleDataset, tmp_path: Path, text_tower_builds: list[str]
) -> None:
    prefix = small_dataset.prefixes[0]
    job = defs.resolve_job_def(PREFIX_JOB_NAME)
    assert job.execute_in_process(instance=instance, partition_key=prefix, run_config=_model_config("random")).success
    # The evaluation alone, under a resource naming other weights (seed 1): its text tower is not these vectors'.
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance,
        partition_key=prefix,
        asset_selection=[AssetKey(tables.EMBEDDING_EVALUATION)],
        run_config=_model_config("random:1"),
    )
    assert result.success
    (row,) = Lake(str(tmp_path / "lake")).read(tables.EMBEDDING_EVALUATION, prefix).to_pylist()
    assert row["model_id"] == CLIP_RANDOM and row["silhouette"] is not None
    assert (row["zero_shot_agreement"], row["zero_shot_agreement_chance"], row["zero_shot_classes"]) == (None,) * 3
    shown = _evaluation_metadata(result)[prefix]
    reason = shown["zero_shot_not_scored"]
    assert CLIP_RANDOM in reason and "open_clip/clip_vit_b_32/random-seed1/fp32" in reason
    assert "zero_shot_agreement" not in shown and f"zero-shot not scored: {reason}" in str(shown["summary"])
    # Only the embedding run's evaluation built a text tower; the mismatched one built none.
    assert text_tower_builds == [CLIP_RANDOM]
