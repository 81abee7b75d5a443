"""The bad-input corpus through the whole graph: no crash, every object in exactly one table, reasons apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dagster import AssetKey, DagsterInstance

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.embedding_column import vectors_of
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import PREFIX_JOB_NAME, SALES_JOB_NAME
from imgemb_assets.definitions import build_definitions
from imgemb_support.bad_inputs import (
    CORPUS_PREFIX,
    TEST_MAX_IMAGE_BYTES,
    accepted_image_ids,
    bad_input_cases,
    write_corpus_dataset,
)
from imgemb_support.location import code_location_instance

defs = build_definitions(LocationSettings())
CORPUS_RUN_CONFIG = {
    "resources": {
        "image_limits": {"config": {"max_image_bytes": TEST_MAX_IMAGE_BYTES}},
        "embedding_model": {"config": {"model": "resnet18", "weights": "random"}},
    }
}

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def test_every_bad_input_is_accounted_for_through_the_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = write_corpus_dataset(tmp_path / "data")
    cases = bad_input_cases()
    with code_location_instance(dataset, tmp_path / "lake", monkeypatch) as instance:
        assert defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=instance).success
        result = defs.resolve_job_def(PREFIX_JOB_NAME).execute_in_process(
            instance=instance, partition_key=CORPUS_PREFIX, run_config=CORPUS_RUN_CONFIG
        )
        assert result.success
        assert all(evaluation.passed for evaluation in result.get_asset_check_evaluations())
        _assert_rejections_recorded_in_dagster(instance)

    lake = Lake(str(tmp_path / "lake"))
    manifest = lake.read(tables.RAW_IMAGE_MANIFEST, CORPUS_PREFIX)
    downscaled = lake.read(tables.DOWNSCALED_IMAGES, CORPUS_PREFIX)
    rejected = lake.read(tables.REJECTED_IMAGES, CORPUS_PREFIX)
    assert manifest.num_rows == len(cases)
    assert downscaled.num_rows + rejected.num_rows == manifest.num_rows

    uri_by_name = {Path(uri).name: uri for uri in manifest.column("uri").to_pylist()}
    reasons = {Path(row["uri"]).name: row["reason"] for row in rejected.to_pylist()}
    assert sorted(downscaled.column("image_id").to_pylist()) == accepted_image_ids(cases)
    for case in cases:
        assert case.file_name in uri_by_name
        if case.reason_part is None:
            assert case.file_name not in reasons
        else:
            assert case.reason_part in reasons[case.file_name], (case.file_name, reasons[case.file_name])
    assert len(set(reasons.values())) == len(reasons)  # each case says what is wrong with it

    embeddings = lake.read(tables.IMAGE_EMBEDDINGS, CORPUS_PREFIX)
    assert sorted(embeddings.column("image_id").to_pylist()) == accepted_image_ids(cases)
    vectors = vectors_of(embeddings.column("embedding"))
    assert vectors.shape == (len(accepted_image_ids(cases)), 512) and np.isfinite(vectors).all()


def _assert_rejections_recorded_in_dagster(instance: DagsterInstance) -> None:
    event = instance.get_latest_materialization_event(AssetKey(tables.REJECTED_IMAGES))
    assert event is not None
    metadata = event.asset_materialization.metadata
    assert metadata["dagster/row_count"].value == len([c for c in bad_input_cases() if c.reason_part])
    assert "file too large" in metadata["reasons"].value
    # A person sees the first rejected objects with their reasons, in an event small enough to keep.
    sheet = metadata["contact_sheet"].value
    assert sheet.startswith("![") and "data:image/jpeg;base64," in sheet and "file too large" in sheet
    assert metadata["contact_sheet_bytes"].value == len(sheet.encode()) <= 40_000
