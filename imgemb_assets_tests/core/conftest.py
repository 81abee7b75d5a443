"""Fixtures shared by the core tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.storage.s3 import S3Settings


@pytest.fixture(params=["local", "s3"])
def any_lake(request: pytest.FixtureRequest, tmp_path: Path) -> Lake:
    if request.param == "local":
        return Lake(str(tmp_path / "lake"))
    bucket = request.getfixturevalue("bucket")
    return Lake(f"s3://{bucket}/lake", S3Settings().delta_storage_options_provider())
