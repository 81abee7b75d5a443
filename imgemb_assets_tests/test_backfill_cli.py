"""The README's user path, exactly as written, on a fresh lake and no daemon:
`imgemb backfill-missing --asset image_embeddings` (which registers the prefixes first); then a repeat
that launches nothing, and a sales change that re-joins every prefix without a forward pass."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import AssetKey, DagsterInstance

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_support.location import REPO_ROOT, code_location_env, run_readme_backfill, run_user_command, user_shell_env

BIN = Path(sys.executable).parent


def _counts(lake: Lake, prefixes: list[str]) -> dict[tuple[str, str], int]:
    names = [name for name in tables.ALL_TABLES if name != tables.SALES]
    return {(name, prefix): lake.read(name, prefix).num_rows for name in names for prefix in prefixes}


@pytest.mark.slow
def test_the_readme_commands_embed_every_prefix_from_a_fresh_lake(
    small_dataset: SampleDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(small_dataset.sales_uri, tmp_path / "sales")
    dataset = replace(small_dataset, sales_uri=str(tmp_path / "sales"))
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    location = code_location_env(dataset, tmp_path / "lake", dagster_home=home)
    env = user_shell_env(location)
    prefixes = dataset.prefixes
    imgemb = str(BIN / "imgemb")

    backfill = run_readme_backfill(env, prefixes)
    assert "sales: materialized first (sales has never been materialized)" in backfill
    assert f"sales and {len(prefixes)} prefixes" in backfill
    lake = Lake(str(tmp_path / "lake"))
    first = _counts(lake, prefixes)
    for prefix in prefixes:
        assert first[(tables.IMAGE_EMBEDDINGS, prefix)] == dataset.expected_joined(prefix)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        runs = instance.get_runs()
    assert len(runs) == 1, "one run: sales and both prefixes"
    assert runs[0].is_success and runs[0].tags["dagster/asset_partition_range_end"] == prefixes[-1]

    again = run_user_command([imgemb, "backfill-missing"], env)
    assert "registered 0 new" in again and "nothing to launch" in again
    assert "registered 0 new" in run_user_command([imgemb, "discover"], env)

    # A new sales export: sales is read again and every prefix re-joined, with no forward pass.
    path = tmp_path / "sales" / "sales.parquet"
    pq.write_table(pq.read_table(path), path, compression="gzip")  # same rows, another file
    refreshed = run_user_command([imgemb, "backfill-missing"], env)
    assert "the sales files changed since sales was last materialized" in refreshed
    assert _counts(lake, prefixes) == first
    with DagsterInstance.get() as instance:
        for prefix in prefixes:
            records = instance.fetch_materializations(AssetKey(tables.IMAGE_EMBEDDINGS), limit=10).records
            latest = next(r for r in records if r.partition_key == prefix)
            assert latest.asset_materialization.metadata["images_embedded"].value == 0
            assert latest.asset_materialization.metadata["images_reused"].value == dataset.expected_joined(prefix)
