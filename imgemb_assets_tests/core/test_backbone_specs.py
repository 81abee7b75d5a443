"""The backbone table: one entry per name of the config's Literal, importable without torch, its facts equal torchvision's and open_clip's."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import get_args

import open_clip
import pytest
import torch
from open_clip.factory import _find_checkpoint_in_dir
from torchvision import models

from imgemb_assets.core.embedding.backbones.checkpoint_dir import (
    CONFIG_FILE,
    PREFERRED_WEIGHTS_FILES,
    read_checkpoint_dir,
)
from imgemb_assets.core.embedding.backbones.specs import BACKBONE_SPECS, BACKBONES, BackboneName, FamilyName
from imgemb_assets.core.embedding.model_settings import EmbeddingSettings

TORCHVISION_SPECS = [name for name, spec in BACKBONE_SPECS.items() if spec.library == "torchvision"]


def test_the_config_literal_names_exactly_the_tables_backbones() -> None:
    assert set(get_args(BackboneName)) == set(BACKBONE_SPECS) == set(BACKBONES)
    assert all(spec.name == name for name, spec in BACKBONE_SPECS.items())
    assert EmbeddingSettings(weights="random").model == "resnet50" == BACKBONES[0]


def test_each_family_is_a_module_with_both_functions() -> None:
    for family in get_args(FamilyName):
        module = importlib.import_module(f"imgemb_assets.core.embedding.backbones.{family}")
        assert callable(module.weights_id) and callable(module.create_model_and_preprocessing), family


_WITHOUT_TORCH = """
import sys
for name in ("torch", "torchvision", "open_clip", "timm", "huggingface_hub"):
    sys.modules[name] = None  # any import of them now raises ImportError
from imgemb_assets.core.embedding.backbones.specs import BACKBONE_SPECS, require_text_tower
from imgemb_assets.core.embedding.model_settings import EmbeddingSettings, model_code_version
assert EmbeddingSettings(weights="random", model="vit_b_16").width == 768
assert EmbeddingSettings(weights=sys.argv[1], model="open_clip_dir").width == 24
require_text_tower("clip_vit_b_32")
print(model_code_version("resnet50", "DEFAULT"), model_code_version("clip_vit_b_32", "DEFAULT"), len(BACKBONE_SPECS))
"""


def test_the_table_and_the_settings_need_no_torch(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model_cfg": {"embed_dim": 24}}))
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"not read here")
    command = [sys.executable, "-c", _WITHOUT_TORCH, str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["resnet50/DEFAULT", "clip_vit_b_32/laion2b_s34b_b79k", str(len(BACKBONE_SPECS))]


@pytest.mark.parametrize("name", TORCHVISION_SPECS)
def test_torchvision_facts_are_torchvisions(name: str) -> None:
    spec = BACKBONE_SPECS[name]
    weights = models.get_model_weights(spec.architecture)
    assert weights.__name__ == spec.weights
    assert weights.DEFAULT.name == spec.default_weights
    with torch.device("meta"):  # the architecture without allocating or initialising its weights
        module = models.get_model_builder(spec.architecture)(weights=None)
    head = getattr(module, spec.head)
    width = head.in_features if isinstance(head, torch.nn.Linear) else module.hidden_dim
    assert width == spec.width


def test_clip_vit_b_32_facts_are_open_clips() -> None:
    spec = BACKBONE_SPECS["clip_vit_b_32"]
    assert spec.architecture is not None and spec.preprocessing is not None and spec.default_weights is not None
    config = open_clip.get_model_config(spec.architecture)
    assert config["embed_dim"] == spec.width
    assert config["vision_cfg"]["image_size"] == spec.preprocessing.input_size
    assert spec.default_weights in open_clip.list_pretrained_tags_by_model(spec.architecture)
    pretrained = open_clip.get_pretrained_cfg(spec.architecture, spec.default_weights)
    assert tuple(pretrained["mean"]) == spec.preprocessing.normalization.mean
    assert tuple(pretrained["std"]) == spec.preprocessing.normalization.std
    assert pretrained["interpolation"] == spec.preprocessing.interpolation
    assert not pretrained.get("quick_gelu", False)  # so the default needs no QuickGELU
    # The tokenizer's BPE vocabulary is part of the package: text encodes offline.
    assert (Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz").is_file()


def test_the_checkpoint_folders_weights_file_is_the_one_open_clip_would_pick(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model_cfg": {"embed_dim": 8}}))
    for name in reversed(PREFERRED_WEIGHTS_FILES):  # open_clip's private chooser, read in its own order
        (tmp_path / name).write_bytes(b"")
        assert read_checkpoint_dir(tmp_path).weights_file == Path(_find_checkpoint_in_dir(tmp_path)), name
