"""The data-quality check functions, fed tables that pass and tables that violate them."""

from __future__ import annotations

import pyarrow as pa

from imgemb_assets.core.quality.checks import (
    duplicate_image_ids,
    embedding_values,
    manifest_accounted_for,
    sales_coverage,
)


def test_duplicate_sales_ids_fail_and_name_an_example() -> None:
    assert duplicate_image_ids(pa.table({"image_id": ["a", "b"]})).passed
    outcome = duplicate_image_ids(pa.table({"image_id": ["a", "b", "a", "c", "c"]}))
    assert not outcome.passed
    assert "2 image_ids appear more than once" in outcome.description and "'a'" in outcome.description


def test_manifest_must_equal_downscaled_plus_rejected() -> None:
    assert manifest_accounted_for(["u1", "u2", "u3"], 2, ["u3"]).passed
    assert not manifest_accounted_for(["u1", "u2", "u3"], 1, ["u3"]).passed  # one object lost
    assert not manifest_accounted_for(["u1", "u2"], 2, ["u1"]).passed  # one object in both tables
    stray = manifest_accounted_for(["u1"], 0, ["elsewhere"])
    assert not stray.passed and "not in the manifest" in stray.description


def test_sales_coverage_warns_below_the_threshold() -> None:
    assert sales_coverage(9, 10, 0.5).passed
    low = sales_coverage(4, 10, 0.5)
    assert not low.passed and "40.0%" in low.description
    assert sales_coverage(0, 0, 0.5).passed  # an empty partition has nothing to cover


def test_embedding_values_need_one_width_and_finite_values() -> None:
    assert embedding_values({2048}, 2048, 0, 10).passed
    assert not embedding_values({2048}, 512, 0, 10).passed
    assert not embedding_values({2048, 512}, None, 0, 10).passed
    nan = embedding_values({2048}, 2048, 3, 10)
    assert not nan.passed and "3 of 10 vectors hold NaN" in nan.description
