"""Prefix names through the user path (`imgemb backfill-missing`, which registers the prefixes first): names with
spaces at either end are partitions like any other, and names that cannot be partitions (not UTF-8, Dagster's
'...', control characters, a link to a folder) are refused by name with the reason while the others go on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import DagsterInstance
from dagster._core.definitions.partitions.utils.base import INVALID_PARTITION_SUBSTRINGS

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import generate_sample_dataset
from imgemb_assets.core.storage.names import partition_key_problem, shown_name
from imgemb_assets.dagster_wiring.names import S3_PREFIX_PARTITIONS_NAME
from imgemb_support.location import code_location_env, user_shell_env

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARTITIONS = (" lead", "ok", "trail ")
# folder name -> a part of the reason it is refused
REFUSED = {
    os.fsdecode(b"r\xe9sum\xe9"): "not valid UTF-8",
    "a...b": "partition range",
    "tab\there": "U+0009",
    "linked": "symbolic link to a folder",
}


@pytest.mark.parametrize("substring", INVALID_PARTITION_SUBSTRINGS)
def test_every_substring_dagster_calls_invalid_is_refused(substring: str) -> None:
    assert partition_key_problem(f"2026{substring}11") is not None


@pytest.mark.slow
def test_backfill_missing_takes_every_valid_prefix_and_names_the_refused_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = generate_sample_dataset(tmp_path / "data", images_per_prefix=2, prefixes=PARTITIONS, seed=2)
    raw = Path(dataset.raw_images_uri)
    for name in REFUSED:
        if name != "linked":
            shutil.copytree(raw / "ok", raw / name)
    (raw / "linked").symlink_to(raw / "ok")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    env = user_shell_env(code_location_env(dataset, tmp_path / "lake", dagster_home=home))
    done = subprocess.run(
        [str(BIN / "imgemb"), "backfill-missing", "--asset", tables.DOWNSCALED_IMAGES],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"registered {len(PARTITIONS)} new" in done.stdout
    for name, reason_part in REFUSED.items():
        (line,) = [
            line for line in done.stderr.splitlines() if line.startswith(f"warning: prefix {shown_name(name)!r}")
        ]
        assert reason_part in line, line
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        assert sorted(instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME)) == sorted(PARTITIONS)
        assert all(run.is_success for run in instance.get_runs())
    lake = Lake(str(tmp_path / "lake"))
    assert lake.partition_keys(tables.DOWNSCALED_IMAGES) == sorted(PARTITIONS)
    for prefix in PARTITIONS:
        image_ids = lake.read(tables.DOWNSCALED_IMAGES, prefix).column("image_id").to_pylist()
        assert sorted(image_ids) == sorted(dataset.image_ids[prefix])
