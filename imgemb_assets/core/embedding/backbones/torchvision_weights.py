"""torchvision's backbones and their weights: random (seeded, labelled), a state-dict file, or torchvision's pretrained ones.

Shared by the torchvision families (resnet, vit); each removes its own classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import models
from torchvision.models import WeightsEnum

from imgemb_assets.core.embedding.backbones.specs import BACKBONE_SPECS, BackboneSpec, Preprocessing
from imgemb_assets.core.embedding.model_settings import RANDOM_WEIGHTS, ModelConfigError, ResolvedWeights


@dataclass(frozen=True)
class TorchvisionBackbone:
    """A table entry's torchvision facts, every one present (see specs.BackboneSpec)."""

    name: str
    architecture: str
    weights: str
    head: str
    preprocessing: Preprocessing


def torchvision_backbone(spec: BackboneSpec) -> TorchvisionBackbone:
    if spec.architecture is None or spec.weights is None or spec.head is None or spec.preprocessing is None:
        raise ModelConfigError(f"{spec.name} is not a torchvision backbone with a classifier")
    return TorchvisionBackbone(spec.name, spec.architecture, spec.weights, spec.head, spec.preprocessing)


def weights_id(spec: BackboneSpec, weights: ResolvedWeights) -> str:
    """The weights' part of the model_id: torchvision's name for pretrained weights (DEFAULT resolved), else the identity."""
    if weights.kind == "pretrained":
        return weights_enum(torchvision_backbone(spec), weights.identity).name
    return weights.identity


def build(spec: TorchvisionBackbone, weights: ResolvedWeights) -> tuple[torch.nn.Module, str]:
    """The full torchvision model (classifier included) with these weights, and where they came from."""
    if weights.seed is not None:
        return _random(spec, weights.seed)
    if weights.path is not None:
        return _from_state_dict(spec, weights.path, weights.identity)
    return _pretrained(spec, weights.identity)


def pretrained_weights_cached(name: str = "DEFAULT", model: str = "resnet50") -> bool:
    """Whether torchvision's weights file is already in the local torch hub cache."""
    weights = weights_enum(torchvision_backbone(BACKBONE_SPECS[model]), name)
    filename = weights.url.rsplit("/", 1)[-1]
    return (Path(torch.hub.get_dir()) / "checkpoints" / filename).is_file()


def weights_enum(spec: TorchvisionBackbone, name: str) -> WeightsEnum:
    enum: type[WeightsEnum] = getattr(models, spec.weights)
    try:
        return enum.DEFAULT if name == "DEFAULT" else enum[name]
    except KeyError as exc:
        choices = ["DEFAULT", *enum.__members__, RANDOM_WEIGHTS, "<path to a state dict>"]
        raise ModelConfigError(f"unknown {spec.name} weights {name!r}; choose one of {choices}") from exc


def _random(spec: TorchvisionBackbone, seed: int) -> tuple[torch.nn.Module, str]:
    # Seed a forked RNG so building the model never disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = models.get_model_builder(spec.architecture)(weights=None)
    return module, f"RANDOM-initialised weights (seed {seed}): embeddings are not meaningful"


def _from_state_dict(spec: TorchvisionBackbone, path: Path, identity: str) -> tuple[torch.nn.Module, str]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ModelConfigError(f"{path} holds a {type(state).__name__}, not a state dict")
    module = models.get_model_builder(spec.architecture)(weights=None)
    # The classifier is dropped anyway, so a backbone-only state dict (saved
    # after removing it) is accepted as well as a full one.
    head = f"{spec.head}."
    body = {key: value for key, value in state.items() if not key.startswith(head)}
    missing, unexpected = module.load_state_dict(body, strict=False)
    missing_body = [key for key in missing if not key.startswith(head)]
    if missing_body or unexpected:
        raise ModelConfigError(
            f"{path} is not a state dict of this backbone: missing {missing_body[:5]}, unexpected {unexpected[:5]}"
        )
    return module, f"state dict {path} ({identity})"


def _pretrained(spec: TorchvisionBackbone, name: str) -> tuple[torch.nn.Module, str]:
    weights = weights_enum(spec, name)
    try:
        module = models.get_model_builder(spec.architecture)(weights=weights)
    except Exception as exc:  # torchvision surfaces network and cache errors with many types
        raise ModelConfigError(
            f"could not load torchvision's pretrained {spec.name} weights {weights.name} "
            f"(they are downloaded once into {torch.hub.get_dir()}): {exc}. "
            "Put them in that cache, set the weights to a state-dict path, "
            "or set them to 'random' for explicitly random weights."
        ) from exc
    return module, f"pretrained torchvision weights {weights.name}"
