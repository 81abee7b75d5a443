"""torchvision's ResNets (resnet50, the default, and resnet18): the model without its `fc` classifier, and its preprocessing."""

from __future__ import annotations

import torch

from imgemb_assets.core.embedding.backbones import torchvision_weights
from imgemb_assets.core.embedding.backbones.family import BuiltBackbone
from imgemb_assets.core.embedding.backbones.specs import BackboneSpec
from imgemb_assets.core.embedding.model_settings import ModelConfigError, ResolvedWeights

weights_id = torchvision_weights.weights_id


def create_model_and_preprocessing(spec: BackboneSpec, weights: ResolvedWeights) -> BuiltBackbone:
    """The ResNet with `fc` replaced by Identity: its vectors are the pooled features, `fc.in_features` wide."""
    backbone = torchvision_weights.torchvision_backbone(spec)
    module, description = torchvision_weights.build(backbone, weights)
    classifier = getattr(module, backbone.head)
    if not isinstance(classifier, torch.nn.Linear):
        raise ModelConfigError(
            f"{spec.name}'s {backbone.head} is a {type(classifier).__name__}, not a Linear classifier"
        )
    setattr(module, backbone.head, torch.nn.Identity())
    return BuiltBackbone(module, backbone.preprocessing, description, int(classifier.in_features))
