"""The class vectors of zero-shot scoring for one evaluation step: a `ZeroShotSource` over the embedding model's settings.

The classes are the distinct values of the label column over the whole sales table,
so every partition is scored against the same prompts whatever labels its own images
carry. They are paired only with image vectors of exactly the text tower's model_id
(same checkpoint, same arithmetic): the vectors of other weights, or of a model the
settings do not name, get a one-line reason instead. The sales column is read, the
text tower built and the prompts encoded at most once per step, on the first partition
whose vectors pair with the tower; a step whose partitions hold no CLIP vectors imports
no torch and builds nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow.compute as pc

from imgemb_assets.core.embedding.backbones.specs import ModelConfigError, has_text_tower
from imgemb_assets.core.embedding.model_settings import (
    EmbeddingSettings,
    ResolvedWeights,
    backbone_of_model_id,
    resolve_weights,
)
from imgemb_assets.core.evaluation.zero_shot_agreement import (
    ZERO_SHOT_PROMPT_TEMPLATE,
    ZeroShotClasses,
    zero_shot_prompts,
)
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake

if TYPE_CHECKING:
    import torch


class StepZeroShot:
    """A `ZeroShotSource` for one step: call it with a partition's model_id for the class vectors, or why not.

    `settings`: the embedding model's, whose text tower encodes the prompts.
    """

    def __init__(
        self, settings: EmbeddingSettings, lake: Lake, label_column: str, template: str = ZERO_SHOT_PROMPT_TEMPLATE
    ) -> None:
        self._settings = settings
        self._lake = lake
        self._label_column = label_column
        self._template = template
        self._weights: ResolvedWeights | None = None
        self._tower_model_id: str | None = None
        self._classes: ZeroShotClasses | None = None
        self.text_tower_builds = 0  # how often the text tower was built: once per step at most

    def __call__(self, model_id: str) -> ZeroShotClasses | str | None:
        configured = self._settings.model
        if not has_text_tower(configured):
            written_by = backbone_of_model_id(model_id)
            if written_by is None or not has_text_tower(written_by):
                return None  # a model without a text tower, as configured: nothing to say
            return (
                f"these vectors are {written_by}'s ({model_id}), but the embedding_model resource names "
                f"{configured}, which has no text tower: set it to the model and weights that wrote them"
            )
        try:
            tower_model_id = self._paired_model_id()
        except ModelConfigError as exc:
            return f"the embedding_model resource's settings give no text tower: {exc}"
        if tower_model_id != model_id:
            return (
                f"these vectors are {model_id}'s, but the embedding_model resource's text tower is "
                f"{tower_model_id}'s: zero-shot needs the text tower of the weights that wrote the vectors"
            )
        return self._encoded_classes()

    def _resolved_weights(self) -> ResolvedWeights:
        if self._weights is None:  # a checkpoint folder is hashed once
            self._weights = resolve_weights(self._settings.weights)
        return self._weights

    def _paired_model_id(self) -> str:
        if self._tower_model_id is None:
            from imgemb_assets.core.embedding.models import model_id_for  # torch: only for a CLIP's settings

            self._tower_model_id = model_id_for(self._settings, self._resolved_weights())
        return self._tower_model_id

    def _encoded_classes(self) -> ZeroShotClasses | str:
        if self._classes is None:
            values = self._label_values()
            if isinstance(values, str):
                return values
            prompts = zero_shot_prompts(values, self._template)
            from imgemb_assets.core.embedding.models import resolve_device  # torch
            from imgemb_assets.core.embedding.text_encoder import load_text_encoder

            if not device_present(resolve_device(self._settings.device)):
                # The evaluation is CPU work and may run where the embedding's GPU is not.
                return f"the text tower is set to run on {self._settings.device}, which this machine does not have"
            encoder = load_text_encoder(self._settings, self._resolved_weights())
            self.text_tower_builds += 1
            self._classes = ZeroShotClasses(encoder.model_id, tuple(prompts), encoder.encode(list(prompts.values())))
        return self._classes

    def _label_values(self) -> list[object] | str:
        if not self._lake.exists(tables.SALES):
            return f"no {tables.SALES} table to take the classes from"
        if self._label_column not in self._lake.schema(tables.SALES).names:
            return f"no column {self._label_column!r} in the {tables.SALES} table to take the classes from"
        column = self._lake.read(tables.SALES, columns=[self._label_column]).column(self._label_column)
        # As they are: zero_shot_prompts and zero_shot_agreement compare every value as str(value).
        return pc.unique(column).to_pylist()


def device_present(device: torch.device) -> bool:
    """Whether `device` exists on this machine (a CUDA device by its index)."""
    import torch

    if device.type != "cuda":
        return True
    return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
