"""A CLIP model's image vectors go into image_embeddings through the pipeline like any model's, named by its checkpoint."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pyarrow.compute as pc
import pytest
import torch

from imgemb_assets.core.embedding.backbones.clip import save_checkpoint_dir
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import PREFIX_JOB_NAME, SALES_JOB_NAME
from imgemb_assets.definitions import build_definitions
from imgemb_support.location import code_location_instance

defs = build_definitions(LocationSettings())
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _embeddings(lake: Lake, prefix: str) -> tuple[set[str], set[int], int]:
    table = lake.read(tables.IMAGE_EMBEDDINGS, prefix)
    widths = set(pc.list_value_length(table.column("embedding")).to_pylist())
    return set(table.column("model_id").to_pylist()), widths, table.num_rows


def test_clip_vectors_fill_image_embeddings_and_a_new_checkpoint_replaces_them(
    small_dataset: SampleDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(2)
    folder = save_checkpoint_dir(open_clip.CLIP(**TINY_CLIP), TINY_CLIP, tmp_path / "tiny")
    prefix = small_dataset.prefixes[0]
    lake = Lake(str(tmp_path / "lake"))

    def embed(model: str, weights: str) -> None:
        config = {"resources": {"embedding_model": {"config": {"model": model, "weights": weights, "device": "cpu"}}}}
        job = defs.resolve_job_def(PREFIX_JOB_NAME)
        assert job.execute_in_process(instance=instance, partition_key=prefix, run_config=config).success

    with code_location_instance(small_dataset, tmp_path / "lake", monkeypatch) as instance:
        assert defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=instance).success
        embed("clip_vit_b_32", "random")
        model_ids, widths, rows = _embeddings(lake, prefix)
        assert (model_ids, widths) == ({"open_clip/clip_vit_b_32/random-seed0/fp32"}, {512}) and rows > 0
        embed("open_clip_dir", str(folder))
        model_ids, widths, again = _embeddings(lake, prefix)
        (model_id,) = model_ids
        assert model_id.startswith("open_clip/open_clip_dir/checkpoint-sha256-") and widths == {32} and again == rows
