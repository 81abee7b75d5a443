"""The `embedding_model` resource: which backbone and weights embed, on what device, in what precision."""

import dataclasses
from typing import Final

import dagster as dg
from pydantic import Field

from imgemb_assets.core.embedding.backbones.specs import BackboneName
from imgemb_assets.core.embedding.model_settings import (
    DecoderName,
    EmbeddingSettings,
    PrecisionName,
    RuntimeName,
    model_code_version,
)


class EmbeddingModelResource(dg.ConfigurableResource):
    """The embedding model's settings; see `EmbeddingSettings` for what each value means."""

    weights: str = Field(
        description="DEFAULT (the library's pretrained weights), another pretrained name, a state-dict path, an "
        "open_clip checkpoint folder (model open_clip_dir), or random / random:<seed>."
    )
    model: BackboneName = Field(default="resnet50", description="Backbone (core/embedding/backbones/specs.py).")
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    batch_size: int | None = Field(default=None, description="Images per forward pass; default 256 on CUDA, 16 on CPU.")
    precision: PrecisionName = Field(default="auto", description="auto: fp16 + channels_last on CUDA, fp32 on CPU.")
    compile: bool | None = Field(
        default=None,
        description="torch.compile with CUDA graphs for the fixed batch shape. Unset: on for CUDA, off for CPU; "
        "a failed compile then leaves the model eager. true: compile or fail the step.",
    )
    decoder: DecoderName = Field(
        default="auto",
        description="What decodes the thumbnails: auto (nvimgcodec, else nvjpeg, else pillow on CUDA; pillow on "
        "CPU), pillow, nvjpeg or nvimgcodec (needs the gpu extra: nvidia-nvimgcodec-cu13[nvjpeg]).",
    )
    runtime: RuntimeName = Field(
        default="auto",
        description="auto: cpu-tuned on CPU (channels_last, glibc malloc keeping activation buffers mapped: vectors "
        "within 5e-7 of eager's, no page-fault storm), eager on CUDA; eager: the module as torchvision builds it.",
    )

    def code_version(self) -> str:
        """The embedding asset's code version for these weights and backbone (see `model_code_version`).

        Read when the location loads: the weights variable, if unset there, gives `unset`.
        """
        weights = self.weights.get_value() if isinstance(self.weights, dg.EnvVar) else self.weights
        return model_code_version(self.model, weights or "unset")

    def settings(self) -> EmbeddingSettings:
        # The resource's fields are EmbeddingSettings' own, by name: a setting added there must be added here too,
        # or this fails at once (test_embedding_resource_fields keeps the two the same).
        return EmbeddingSettings(**{name: getattr(self, name) for name in _SETTING_NAMES})


_SETTING_NAMES: Final = tuple(setting.name for setting in dataclasses.fields(EmbeddingSettings))
