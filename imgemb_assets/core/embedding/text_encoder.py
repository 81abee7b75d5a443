"""The text tower of a CLIP backbone: texts to L2-normalised vectors in the space of its image vectors.

For text-to-image search and zero-shot labels. A text vector is comparable only with
image vectors of the same weights and arithmetic, so `TextEncoder.model_id` is exactly
the model_id the image tower writes under the same settings (one checkpoint holds both
towers, and the id names it): pair a text encoder with an index or a table's vectors by
equal model_ids, and refuse otherwise. A backbone without a text tower is told apart
without torch (`backbones.specs.has_text_tower`, `require_text_tower`) and refused here
with `NoTextTower`, a ModelConfigError of one line.

Example:

    settings = EmbeddingSettings(weights="DEFAULT", model="clip_vit_b_32")
    encoder = load_text_encoder(settings)
    vectors = encoder.encode(["red running shoes"])  # (1, 512) float32, unit length
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch

from imgemb_assets.core.embedding.backbones.family import TextTowerFamily
from imgemb_assets.core.embedding.backbones.specs import BACKBONE_SPECS, BackboneSpec, NoTextTower, require_text_tower
from imgemb_assets.core.embedding.model_settings import (
    EmbeddingSettings,
    ResolvedWeights,
    resolve_weights,
)
from imgemb_assets.core.embedding.models import model_id_for, placement, require_width

# Texts per forward pass: prompts are short (77 tokens at most), so a pass of 256 stays small on any device.
TEXT_BATCH_SIZE: Final = 256


@dataclass(frozen=True)
class TextEncoder:
    """A CLIP's text tower placed on its device, with its tokenizer.

    module: (N, context_length) token ids to (N, width) unnormalised vectors.
    tokenize: texts to token ids, each cut to `context_length` tokens (open_clip's tokenizer, offline).
    model_id: the model_id of the image vectors these text vectors pair with.
    """

    module: torch.nn.Module
    tokenize: Callable[[list[str]], torch.Tensor]
    model_id: str
    weights_description: str
    is_random: bool
    device: torch.device  # where the token ids go; the module is placed there in the settings' precision
    width: int
    context_length: int
    batch_size: int = TEXT_BATCH_SIZE

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), width) float32 vectors, each L2-normalised (in fp32), in input order."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not one string: pass [text]")
        out = np.empty((len(texts), self.width), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = list(texts[start : start + self.batch_size])
                vectors = self.module(self.tokenize(batch).to(self.device)).float()
                out[start : start + len(batch)] = torch.nn.functional.normalize(vectors, dim=-1).cpu().numpy()
        return out


def load_text_encoder(settings: EmbeddingSettings, weights: ResolvedWeights | None = None) -> TextEncoder:
    """The text tower of `settings`' model with its weights (resolved once), ready to encode; NoTextTower if it has none.

    The device and precision follow `settings` as the image tower's do, so the
    encoder's model_id is the one its image vectors are stored under.
    """
    require_text_tower(settings.model)
    spec = BACKBONE_SPECS[settings.model]
    weights = weights or resolve_weights(settings.weights)
    built = _text_family_of(spec).create_text_tower(spec, weights)
    require_width(settings, built.width, f"{settings.model}'s text tower")
    device, dtype = placement(settings)
    return TextEncoder(
        module=built.module.eval().to(device=device, dtype=dtype),
        tokenize=built.tokenize,
        model_id=model_id_for(settings, weights),
        weights_description=built.weights_description,
        is_random=weights.kind == "random",
        device=device,
        width=built.width,
        context_length=built.context_length,
    )


def _text_family_of(spec: BackboneSpec) -> TextTowerFamily:
    if spec.family == "clip":
        from imgemb_assets.core.embedding.backbones import clip

        return clip
    raise NoTextTower(f"{spec.name} has no text tower")
