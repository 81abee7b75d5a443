"""`dagster asset materialize` from the CLI materializes a partition given only the IMGEMB_* variables
(plus the AWS ones for s3:// roots) and a DAGSTER_HOME, on a local folder and on the moto S3 server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_assets.dagster_wiring.names import S3_PREFIX_PARTITIONS_NAME
from imgemb_support.location import code_location_env, dataset_on_s3, run_user_process, user_shell_env

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_asset_materialize_cli_runs_every_asset_for_one_partition(
    where: str,
    small_dataset: SampleDataset,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    if where == "s3":
        bucket = request.getfixturevalue("bucket")  # also sets the AWS variables for the moto server
        dataset, lake_uri = dataset_on_s3(small_dataset, bucket), f"s3://{bucket}/delta"
        lake = Lake(lake_uri, storage_options=S3Settings().delta_storage_options())
    else:
        dataset, lake_uri = small_dataset, str(tmp_path / "lake")
        lake = Lake(lake_uri)
    location_env = code_location_env(dataset, lake_uri, dagster_home=home)
    prefix = dataset.prefixes[1]
    # No dagster CLI command adds dynamic partitions: register it the way the sensor will.
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, [prefix])
    env = user_shell_env(location_env)
    dagster = Path(sys.executable).with_name("dagster")
    materialize = ["asset", "materialize", "-m", "imgemb_assets.definitions", "--select", "*", "--partition", prefix]
    run_user_process([str(dagster), *materialize], env, cwd=tmp_path)
    assert lake.read(tables.RAW_IMAGE_MANIFEST).column("prefix").unique().to_pylist() == [prefix]
    assert lake.read(tables.DOWNSCALED_IMAGES, prefix).num_rows == len(small_dataset.image_ids[prefix])
    assert lake.read(tables.REJECTED_IMAGES, prefix).num_rows == len(small_dataset.broken_files[prefix])
    assert lake.read(tables.IMAGE_EMBEDDINGS, prefix).num_rows == small_dataset.expected_joined(prefix)
    with DagsterInstance.get() as instance:
        latest = instance.get_latest_materialization_event(AssetKey(tables.IMAGE_EMBEDDINGS))
    assert latest is not None, "the run is recorded in the instance the UI reads"


SECRET_URI_PARTS = ("AKIAEXAMPLEKEY", "wJalrXUtnFEMIexamplesecret")


@pytest.mark.parametrize("variable", ["IMGEMB_RAW_IMAGES_URI", "IMGEMB_SALES_URI"])
def test_credentials_written_into_an_s3_uri_are_refused_in_one_line_that_does_not_repeat_them(
    variable: str, tmp_path: Path
) -> None:
    key, secret = SECRET_URI_PARTS
    env = user_shell_env(
        {
            "IMGEMB_RAW_IMAGES_URI": str(tmp_path / "raw"),
            "IMGEMB_SALES_URI": str(tmp_path / "sales"),
            "IMGEMB_LAKE_URI": str(tmp_path / "lake"),
            variable: f"s3://{key}:{secret}@my-bucket/data",
        }
    ) | {"DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "raw").mkdir()
    imgemb = Path(sys.executable).with_name("imgemb")
    command = ["discover"] if variable == "IMGEMB_RAW_IMAGES_URI" else ["backfill-missing", "--in-process"]
    done = subprocess.run([str(imgemb), *command], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "carries credentials (s3://<credentials>@my-bucket/...)" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not any(part in done.stdout + done.stderr for part in SECRET_URI_PARTS)


def test_a_lake_or_store_uri_with_credentials_is_refused_without_repeating_them() -> None:
    from imgemb_assets.core.storage.open_store import open_object_store
    from imgemb_assets.core.storage.s3 import S3ConfigError

    key, secret = SECRET_URI_PARTS
    for open_it in (Lake, open_object_store):
        with pytest.raises(S3ConfigError) as refused:
            open_it(f"s3://{key}:{secret}@my-bucket/lake")
        assert key not in str(refused.value) and secret not in str(refused.value)
