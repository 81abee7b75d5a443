"""What a backbone family provides: the weights' name for the model_id, the model built with its preprocessing, and
for a family with a text tower (clip) that tower with its tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from imgemb_assets.core.embedding.backbones.specs import BackboneSpec, Preprocessing
from imgemb_assets.core.embedding.model_settings import ResolvedWeights


@dataclass(frozen=True)
class BuiltBackbone:
    """A backbone as its family built it, on the CPU in fp32, before models.load_model places and tunes it.

    module: takes preprocessed (N, 3, S, S) images, gives (N, width) vectors; its classifier removed.
    preprocessing: what turns stored thumbnails into its input; travels with the module.
    weights_description: for people: where the weights came from (says RANDOM for random weights).
    """

    module: torch.nn.Module
    preprocessing: Preprocessing
    weights_description: str
    width: int


@dataclass(frozen=True)
class BuiltTextTower:
    """A text tower as its family built it, on the CPU in fp32, before text_encoder.load_text_encoder places it.

    module: takes (N, context_length) token ids, gives (N, width) vectors in the image tower's space.
    tokenize: texts to (N, context_length) int64 token ids, each cut to `context_length` tokens.
    """

    module: torch.nn.Module
    tokenize: Callable[[list[str]], torch.Tensor]
    context_length: int
    weights_description: str
    width: int


class BackboneFamily(Protocol):
    """The two functions each module of core/embedding/backbones/ that builds models defines."""

    def weights_id(self, spec: BackboneSpec, weights: ResolvedWeights) -> str:
        """The weights' part of the model_id, without building anything (`DEFAULT` resolved to what it means)."""
        ...

    def create_model_and_preprocessing(self, spec: BackboneSpec, weights: ResolvedWeights) -> BuiltBackbone:
        """The backbone without its classifier, with these weights, and the preprocessing its input needs."""
        ...


class TextTowerFamily(Protocol):
    """What a family whose weights hold a text tower (clip) defines besides BackboneFamily's two functions."""

    def create_text_tower(self, spec: BackboneSpec, weights: ResolvedWeights) -> BuiltTextTower:
        """The text tower of the checkpoint these weights name, with its tokenizer."""
        ...
