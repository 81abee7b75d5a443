"""Buckets as their owners lay them out, through the README's two commands (`imgemb discover`, `imgemb
backfill-missing --asset image_embeddings`) with no setting changed: the article's flat root (every photo
directly under it) embedded completely, locally and on the moto S3 server; then one photo added to an embedded
partition on S3: running the two commands again reads that one object from the bucket (its GETs counted by a
proxy in front of moto) and embeds that one image. Also a date layout three levels deep under `folders:3`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance

from imgemb_assets.core.ingest.partition_scheme import LOOSE_FOLDER, PartitionScheme
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_support.fault_proxy import OBJECT_GET, running_fault_proxy
from imgemb_support.location import REPO_ROOT, code_location_env, run_user_command, upload_tree, user_shell_env
from imgemb_support.moto_server import client_environment

BIN = Path(sys.executable).parent
IMGEMB = str(BIN / "imgemb")


def _flatten(dataset: SampleDataset, root: Path) -> list[str]:
    """The dataset's photos and broken files all directly under `root`, as in the article's bucket; their names."""
    root.mkdir(parents=True)
    names = []
    for prefix in dataset.prefixes:
        for path in sorted((Path(dataset.raw_images_uri) / prefix).iterdir()):
            shutil.copy(path, root / path.name)
            names.append(path.name)
    assert len(set(names)) == len(names), "the sample's file names are unique across prefixes"
    return names


def _expected_embedded(dataset: SampleDataset) -> set[str]:
    return {i for prefix in dataset.prefixes for i in dataset.image_ids[prefix]} & set(dataset.sales_image_ids)


def _instance_env(tmp_path: Path, location: dict[str, str]) -> dict[str, str]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    return user_shell_env(location | {"DAGSTER_HOME": str(home)})


def _readme_commands(env: dict[str, str]) -> str:
    return run_user_command([IMGEMB, "discover"], env) + run_user_command(
        [IMGEMB, "backfill-missing", "--asset", "image_embeddings"], env
    )


def _embedded_ids(lake: Lake) -> list[str]:
    return lake.read(tables.IMAGE_EMBEDDINGS, columns=["image_id"]).column("image_id").to_pylist()


@pytest.mark.slow
def test_the_articles_flat_root_is_embedded_with_no_setting_changed(
    small_dataset: SampleDataset, tmp_path: Path
) -> None:
    _flatten(small_dataset, tmp_path / "raw")
    dataset = replace(small_dataset, raw_images_uri=str(tmp_path / "raw"))
    env = _instance_env(tmp_path, code_location_env(dataset, tmp_path / "lake"))
    output = _readme_commands(env)
    assert "warning" not in output
    lake = Lake(str(tmp_path / "lake"))
    embedded = _embedded_ids(lake)
    assert sorted(embedded) == sorted(_expected_embedded(dataset)), "every photo embedded, each once"
    keys = set(lake.read(tables.IMAGE_EMBEDDINGS, columns=["prefix"]).column("prefix").to_pylist())
    assert keys and all(key.startswith(f"{LOOSE_FOLDER}/part-") for key in keys)
    manifest = lake.read(tables.RAW_IMAGE_MANIFEST, columns=["uri"]).num_rows
    accounted = (
        lake.read(tables.DOWNSCALED_IMAGES, columns=["image_id"]).num_rows
        + lake.read(tables.REJECTED_IMAGES, columns=["uri"]).num_rows
    )
    assert manifest == accounted == len(list((tmp_path / "raw").iterdir())), (
        "every object in the manifest, and accounted for"
    )


@pytest.mark.slow
def test_date_folders_three_levels_deep_give_one_partition_per_day(
    small_dataset: SampleDataset, tmp_path: Path
) -> None:
    raw = tmp_path / "raw"
    for prefix in small_dataset.prefixes:  # 2026-11-01 -> 2026/11/01
        shutil.copytree(Path(small_dataset.raw_images_uri) / prefix, raw / prefix.replace("-", "/"))
    dataset = replace(small_dataset, raw_images_uri=str(raw))
    env = _instance_env(
        tmp_path, code_location_env(dataset, tmp_path / "lake") | {"IMGEMB_PARTITION_SCHEME": "folders:3"}
    )
    output = _readme_commands(env)
    days = [prefix.replace("-", "/") for prefix in small_dataset.prefixes]
    assert f"registered {len(days)} new: {days}" in output
    lake = Lake(str(tmp_path / "lake"))
    for prefix, day in zip(small_dataset.prefixes, days):
        assert lake.read(tables.IMAGE_EMBEDDINGS, day).num_rows == small_dataset.expected_joined(prefix)
    # the lake now records folders:3: the default scheme is refused with a clear message
    refused = env | {"IMGEMB_PARTITION_SCHEME": "folders"}
    done = subprocess.run([IMGEMB, "discover"], env=refused, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2 and "written with partition scheme 'folders:3'" in done.stderr


@pytest.mark.slow
def test_one_photo_added_on_s3_is_the_one_object_read_and_embedded_again(
    small_dataset: SampleDataset, tmp_path: Path, moto_endpoint: str, bucket: str
) -> None:
    flat = tmp_path / "flat"
    names = _flatten(small_dataset, flat)
    client = S3Settings().client()
    upload_tree(client, flat, bucket, "raw-images")
    upload_tree(client, Path(small_dataset.sales_uri), bucket, "sales-data")
    dataset = replace(small_dataset, raw_images_uri=f"s3://{bucket}/raw-images", sales_uri=f"s3://{bucket}/sales-data")
    with running_fault_proxy(moto_endpoint) as proxy:
        # The lake on local disk: what the proxy counts is the bucket's raw images alone.
        location = code_location_env(dataset, tmp_path / "lake") | client_environment(proxy.url)
        env = _instance_env(tmp_path, location)
        _readme_commands(env)
        first_reads = _keys_of(proxy.stats(), bucket)
        assert sorted(first_reads) == sorted(names)
        # each photo read once; a rejected file once more, for its preview on the contact sheet
        assert {name for name, count in first_reads.items() if count != 1} <= set(_broken(dataset))

        # one new photo: a copy of an embedded one, named after an id the sales export has no image for
        new_id = sorted(set(dataset.sales_image_ids) - {i for p in dataset.prefixes for i in dataset.image_ids[p]})[0]
        photo = next(name for name in names if name.rsplit(".", 1)[0] in dataset.image_ids[dataset.prefixes[0]])
        client.upload_file(str(flat / photo), bucket, f"raw-images/{new_id}.jpg")
        before = proxy.stats()
        again = _readme_commands(env)
        after = proxy.stats()
        reads = {
            key: after.get(f"{OBJECT_GET}/{bucket}/raw-images/{key}", 0) - count
            for key, count in _keys_of(before, bucket).items()
        }
        reads[f"{new_id}.jpg"] = after.get(f"{OBJECT_GET}/{bucket}/raw-images/{new_id}.jpg", 0)
        assert {key: n for key, n in reads.items() if n} == {f"{new_id}.jpg": 1}, again
    lake = Lake(str(tmp_path / "lake"))
    partition = PartitionScheme().partition_of(f"{new_id}.jpg")
    assert new_id in _embedded_ids(lake)
    with _instance(env) as instance:
        records = instance.fetch_materializations(AssetKey(tables.IMAGE_EMBEDDINGS), limit=100).records
    latest = next(record for record in records if record.partition_key == partition)
    metadata = latest.asset_materialization.metadata
    assert metadata["images_embedded"].value == 1
    assert metadata["images_reused"].value == lake.read(tables.IMAGE_EMBEDDINGS, partition).num_rows - 1


def _broken(dataset: SampleDataset) -> list[str]:
    return [name for prefix in dataset.prefixes for name in dataset.broken_files[prefix]]


def _keys_of(stats: dict[str, int], bucket: str) -> dict[str, int]:
    """raw-images key -> how often the proxy saw it read."""
    start = f"{OBJECT_GET}/{bucket}/raw-images/"
    return {key[len(start) :]: count for key, count in stats.items() if key.startswith(start)}


def _instance(env: dict[str, str]) -> DagsterInstance:
    from dagster._core.instance.ref import InstanceRef

    return DagsterInstance.from_ref(InstanceRef.from_dir(env["DAGSTER_HOME"]))
