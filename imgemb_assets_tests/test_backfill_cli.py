"""Backfills from the command line: `imgemb discover`, `imgemb backfill-missing` (which runs
`dagster job backfill`), and a repeated backfill that changes no row and recomputes no vector."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance

from imgemb_assets.core import tables
from imgemb_assets.core.lake import Lake
from imgemb_assets.core.sample_data import SampleDataset
from imgemb_assets_tests.conftest import code_location_env

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _counts(lake: Lake, prefixes: list[str]) -> dict[tuple[str, str], int]:
    names = [name for name in tables.ALL_TABLES if name != tables.SALES]
    return {(name, prefix): lake.read(name, prefix).num_rows for name in names for prefix in prefixes}


@pytest.mark.slow
def test_discover_backfill_missing_and_a_repeated_backfill(
    small_dataset: SampleDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    location = code_location_env(small_dataset, tmp_path / "lake", dagster_home=home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGEMB_")} | location
    prefixes = small_dataset.prefixes

    assert f"registered {len(prefixes)} new" in _run([str(BIN / "imgemb"), "discover"], env)
    assert "registered 0 new" in _run([str(BIN / "imgemb"), "discover"], env)
    _run([str(BIN / "dagster"), "asset", "materialize", "-m", "imgemb_assets.definitions", "--select", "sales"], env)

    launched = _run([str(BIN / "imgemb"), "backfill-missing", "--asset", "image_embeddings"], env)
    assert f"launching embed_prefix for: {prefixes}" in launched
    lake = Lake(str(tmp_path / "lake"))
    first = _counts(lake, prefixes)
    for prefix in prefixes:
        assert first[(tables.IMAGE_EMBEDDINGS, prefix)] == small_dataset.expected_joined(prefix)
    assert "nothing to launch" in _run([str(BIN / "imgemb"), "backfill-missing"], env)

    # The documented Dagster command, once more over every partition: same rows, no forward pass.
    _run(
        [str(BIN / "dagster"), "job", "backfill", "-m", "imgemb_assets.definitions", "-j", "embed_prefix",
         "--partitions", ",".join(prefixes), "--noprompt"],
        env,
    )  # fmt: skip
    assert _counts(lake, prefixes) == first
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        for prefix in prefixes:
            records = instance.fetch_materializations(AssetKey(tables.IMAGE_EMBEDDINGS), limit=10).records
            latest = [r for r in records if r.partition_key == prefix][0]
            assert latest.asset_materialization.metadata["images_embedded"].value == 0
