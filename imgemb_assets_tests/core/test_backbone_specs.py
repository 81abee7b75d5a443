"""The backbone table: one entry per name of the config's Literal, importable without torch, its facts equal torchvision's."""

from __future__ import annotations

import importlib
import subprocess
import sys
from typing import get_args

import pytest
import torch
from torchvision import models

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
for name in ("torch", "torchvision", "open_clip"):
    sys.modules[name] = None  # any import of them now raises ImportError
from imgemb_assets.core.embedding.backbones.specs import BACKBONE_SPECS
from imgemb_assets.core.embedding.model_settings import EmbeddingSettings, model_code_version
assert EmbeddingSettings(weights="random", model="vit_b_16").width == 768
print(model_code_version("resnet50", "DEFAULT"), len(BACKBONE_SPECS))
"""


def test_the_table_and_the_settings_need_no_torch() -> None:
    done = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["resnet50/DEFAULT", str(len(BACKBONE_SPECS))]


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
