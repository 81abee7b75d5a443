"""Shared fixtures: a small generated sample dataset and the environment that points the code location at it."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgemb_assets.core.sample_data import SampleDataset, generate_sample_dataset

SMALL_PREFIXES = ("2026-11-01", "2026-11-02")


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> SampleDataset:
    """Two prefixes of eight images each, with the sample's broken files spread over them."""
    return generate_sample_dataset(
        tmp_path_factory.mktemp("sample"), images_per_prefix=8, prefixes=SMALL_PREFIXES, seed=1
    )


def code_location_env(dataset: SampleDataset, lake: Path, dagster_home: Path | None = None) -> dict[str, str]:
    """The IMGEMB_* variables (and DAGSTER_HOME) a user sets to run the code location on `dataset`."""
    env = {
        "IMGEMB_RAW_IMAGES_URI": dataset.raw_images_uri,
        "IMGEMB_SALES_URI": dataset.sales_uri,
        "IMGEMB_LAKE_URI": str(lake),
        "IMGEMB_MODEL_WEIGHTS": "random",
    }
    if dagster_home is not None:
        env["DAGSTER_HOME"] = str(dagster_home)
    return env
