"""The code location's Definitions load and validate, with the expected assets, jobs and resources."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetKey, Definitions, DynamicPartitionsDefinition

from imgemb_assets.core.lake import tables
from imgemb_assets.dagster_wiring.location.settings import LocationSettings, SettingsError
from imgemb_assets.dagster_wiring.names import RAW_IMAGES, SALES_EXPORT, SEARCH_INDEX
from imgemb_assets.definitions import build_definitions
from imgemb_support.location import user_shell_env

defs = build_definitions(LocationSettings())

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_definitions_validate() -> None:
    Definitions.validate_loadable(defs)


# The pipeline's tables, those derived from the embeddings, and the search index.
MATERIALIZED = {*tables.ALL_TABLES, *tables.DERIVED_TABLES, SEARCH_INDEX}
# One asset each for every prefix: the sales table and what the whole embedding table feeds.
UNPARTITIONED = {tables.SALES, SALES_EXPORT, SEARCH_INDEX, tables.NEAR_DUPLICATES}


def test_every_table_is_an_asset_and_partitioned_by_prefix_except_the_whole_table_ones() -> None:
    graph = defs.resolve_asset_graph()
    assert {key.to_user_string() for key in graph.get_all_asset_keys()} == MATERIALIZED | {RAW_IMAGES, SALES_EXPORT}
    # what the pipeline reads is external: reported by the sensors, never materialized by a run
    assert {key.to_user_string() for key in graph.materializable_asset_keys} == MATERIALIZED
    for name in [*MATERIALIZED, RAW_IMAGES, SALES_EXPORT]:
        partitions = graph.get(AssetKey(name)).partitions_def
        if name in UNPARTITIONED:
            assert partitions is None
        else:
            assert isinstance(partitions, DynamicPartitionsDefinition)
            assert partitions.name == "s3_prefix"


def test_lineage_follows_the_article() -> None:
    graph = defs.resolve_asset_graph()

    def parents(name: str) -> set[str]:
        return {key.to_user_string() for key in graph.get(AssetKey(name)).parent_keys}

    assert parents(tables.RAW_IMAGE_MANIFEST) == {RAW_IMAGES}
    assert parents(tables.SALES) == {SALES_EXPORT}
    assert parents(tables.DOWNSCALED_IMAGES) == {tables.RAW_IMAGE_MANIFEST}
    assert parents(tables.REJECTED_IMAGES) == {tables.RAW_IMAGE_MANIFEST}
    assert parents(tables.IMAGES_WITH_SALES) == {tables.DOWNSCALED_IMAGES, tables.SALES}
    assert parents(tables.IMAGE_EMBEDDINGS) == {tables.IMAGES_WITH_SALES}


def test_jobs_exist() -> None:
    assert defs.resolve_job_def("embed_prefix").partitions_def is not None
    assert defs.resolve_job_def("refresh_sales").partitions_def is None


def test_loading_the_code_location_does_not_import_torch() -> None:
    # Every step process, sensor evaluation and code server loads the location;
    # only the embedding step should pay for torch.
    code = "import sys, imgemb_assets.definitions; print(sorted({'torch', 'sklearn', 'usearch'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_dagster_cli_validates_the_workspace() -> None:
    dagster = Path(sys.executable).with_name("dagster")
    done = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=user_shell_env({}),
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Validation successful" in done.stdout + done.stderr


def test_every_partitioned_asset_takes_many_prefixes_per_run() -> None:
    graph = build_definitions(LocationSettings(max_partitions_per_run=7)).resolve_asset_graph()
    for name in MATERIALIZED - UNPARTITIONED:
        if name != tables.SALES:
            policy = graph.get(AssetKey(name)).backfill_policy
            assert policy is not None and policy.max_partitions_per_run == 7, name


def test_the_embedding_code_version_names_the_backbone_and_the_weights(tmp_path: Path) -> None:
    """Other weights give another code version, so the UI marks partitions embedded before stale."""
    from imgemb_assets.dagster_wiring.embedding.resources import EmbeddingModelResource
    from imgemb_assets.definitions import default_resources

    def code_version(model: EmbeddingModelResource) -> str | None:
        graph = build_definitions(
            LocationSettings(), {**default_resources(), "embedding_model": model}
        ).resolve_asset_graph()
        return graph.get(AssetKey(tables.IMAGE_EMBEDDINGS)).code_version

    state_dict = tmp_path / "weights.pt"
    state_dict.write_bytes(b"one")
    first = code_version(EmbeddingModelResource(weights=str(state_dict)))
    state_dict.write_bytes(b"two")  # the same path, other content
    versions = [
        code_version(EmbeddingModelResource(weights="random:0")),
        code_version(EmbeddingModelResource(weights="random:1")),
        code_version(EmbeddingModelResource(weights="random:0", model="resnet18")),
        first,
        code_version(EmbeddingModelResource(weights=str(state_dict))),
    ]
    assert versions[0] == "resnet50/random-seed0" and versions[3].startswith("resnet50/state-dict-sha256-")
    assert len(set(versions)) == len(versions)


def test_embedding_resource_fields_are_the_settings_fields_and_pass_every_value() -> None:
    """The resource hands each field to EmbeddingSettings by name: a setting one side lacks would be lost."""
    from imgemb_assets.core.embedding.model_settings import EmbeddingSettings
    from imgemb_assets.dagster_wiring.embedding.resources import EmbeddingModelResource

    assert set(EmbeddingModelResource.model_fields) == {field.name for field in dataclasses.fields(EmbeddingSettings)}
    chosen = EmbeddingSettings(
        weights="random:3",
        device="cpu",
        batch_size=7,
        model="resnet18",
        precision="fp32",
        compile=False,
        runtime="eager",
        decoder="pillow",
    )
    assert EmbeddingModelResource(**dataclasses.asdict(chosen)).settings() == chosen
    # every value above differs from its default, so a field not passed on would show
    defaults = EmbeddingSettings(weights="random")
    assert all(getattr(chosen, name) != getattr(defaults, name) for name in EmbeddingModelResource.model_fields)


def test_imgemb_model_sets_the_backbone_the_location_embeds_and_evaluates_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Read when the location loads, as the weights are for the code version: the UI and automation agree."""
    monkeypatch.setenv("IMGEMB_MODEL_WEIGHTS", "random")
    location = build_definitions(LocationSettings.from_environ({"IMGEMB_MODEL": "clip_vit_b_32"}))
    assert location.resources is not None and location.resources["embedding_model"].model == "clip_vit_b_32"
    graph = location.resolve_asset_graph()
    for asset in (tables.IMAGE_EMBEDDINGS, tables.EMBEDDING_EVALUATION):
        assert graph.get(AssetKey(asset)).code_version == "clip_vit_b_32/random-seed0"
    assert defs.resources is not None and defs.resources["embedding_model"].model == "resnet50"
    with pytest.raises(SettingsError, match="IMGEMB_MODEL must be one of .*'clip_vit_b_32'.*got 'clip'"):
        LocationSettings.from_environ({"IMGEMB_MODEL": "clip"})
