"""torchvision's Vision Transformers (vit_b_16): the model without its `heads` classifier, and its preprocessing."""

from __future__ import annotations

import torch
from torchvision.models import VisionTransformer

from imgemb_assets.core.embedding.backbones import torchvision_weights
from imgemb_assets.core.embedding.backbones.family import BuiltBackbone
from imgemb_assets.core.embedding.backbones.specs import BackboneSpec
from imgemb_assets.core.embedding.model_settings import ModelConfigError, ResolvedWeights

weights_id = torchvision_weights.weights_id


def create_model_and_preprocessing(spec: BackboneSpec, weights: ResolvedWeights) -> BuiltBackbone:
    """The ViT with `heads` replaced by Identity: its vectors are the class token's, `hidden_dim` wide."""
    backbone = torchvision_weights.torchvision_backbone(spec)
    module, description = torchvision_weights.build(backbone, weights)
    # A ViT's heads are a Sequential; its width is the encoder's, which it keeps as an int attribute.
    if not isinstance(module, VisionTransformer):
        raise ModelConfigError(f"cannot tell the embedding width of a {type(module).__name__}")
    setattr(module, backbone.head, torch.nn.Identity())
    return BuiltBackbone(module, backbone.preprocessing, description, int(module.hidden_dim))
