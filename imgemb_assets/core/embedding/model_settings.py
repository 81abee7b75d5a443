"""The embedding model's settings, validated without importing torch.

Dagster resources build these when a code location loads, so this module stays
free of torch: only the step that embeds pays for importing it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, get_args

from imgemb_assets.core.embedding.backbones.checkpoint_dir import CONFIG_FILE as CHECKPOINT_CONFIG_FILE
from imgemb_assets.core.embedding.backbones.checkpoint_dir import CheckpointDir, read_checkpoint_dir
from imgemb_assets.core.embedding.backbones.specs import BACKBONE_SPECS, BACKBONES, ModelConfigError

# A quarter of the article's 64: model-only images/s within 4% of 64 on a 2-core CPU
# (22.7 vs 23.6), and each batch's activations small enough that a run's free heap
# stays under allocator.DEFAULT_KEPT_FREE_BYTES, so no prefix faults them in again:
# end to end 25.6 s vs 26.3 s at 32, peak PSS 1.9 GB vs 2.3 GB (issue-10 note).
CPU_BATCH_SIZE: Final = 16
GPU_BATCH_SIZE: Final = 256
RANDOM_WEIGHTS: Final = "random"
# Each choice declared once, as the type the Dagster resource's config uses; the tuples derive from it.
PrecisionName = Literal["auto", "fp32", "fp16", "bf16"]  # auto: fp16 on CUDA, fp32 on CPU
# How the forward pass runs (see EmbeddingSettings.runtime); auto: cpu-tuned on CPU, eager on CUDA.
RuntimeName = Literal["auto", "eager", "cpu-tuned"]
# What decodes the stored thumbnails (see EmbeddingSettings.decoder and core/embedding/thumbnail_decoders.py).
DecoderName = Literal["auto", "pillow", "nvjpeg", "nvimgcodec"]
PRECISIONS: Final = get_args(PrecisionName)
RUNTIMES: Final = get_args(RuntimeName)
DECODERS: Final = get_args(DecoderName)
# Decoders that write into GPU memory: refused on a CPU device rather than silently replaced.
GPU_DECODERS: Final = frozenset({"nvjpeg", "nvimgcodec"})
_DEVICE_PATTERN: Final = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class EmbeddingSettings:
    """How to build and run the model.

    weights: a pretrained weights name, downloaded once into the library's own
    cache: torchvision's such as `DEFAULT` or `IMAGENET1K_V2`, open_clip's tags
    such as `DEFAULT` (laion2b_s34b_b79k for clip_vit_b_32) or `openai`; the path
    of a state-dict file (for open_clip, any checkpoint file open_clip loads);
    the path of an open_clip checkpoint folder (model open_clip_dir, which takes
    its architecture from it: see backbones/checkpoint_dir.py); or `random` /
    `random:<seed>` for explicitly random-initialised weights.
    device: `auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`.
    model: a backbone of `backbones.specs.BACKBONE_SPECS`, its classifier removed.
    batch_size: images per forward pass; None for 256 on CUDA and 16 on CPU.
    precision: `auto` is fp16 with channels_last on CUDA and fp32 on CPU.
    compile: run the model through torch.compile for one fixed batch shape
    (CUDA graphs on CUDA; a partial batch is padded to it and the padding rows
    dropped). None (the default) means on for CUDA, off for CPU; True or False
    is obeyed on any device, and an explicit True that fails to compile is an
    error, where None falls back to eager (see models.CompiledForward).
    runtime: `eager` runs the torchvision module as built (on CPU: fp32,
    contiguous tensors, the process's malloc untouched: the pinned reference).
    `cpu-tuned` is the same weights in channels_last, with glibc malloc told
    to keep freed activation buffers mapped (process-wide, see core/embedding/allocator.py):
    vectors within 5e-7 (relative) of eager's, without the page-fault storm
    that made eager 2-3x slower on a busy CPU, and 1.16-1.19x faster
    convolutions. On CUDA both are today's path (fp16 + channels_last).
    `auto`: cpu-tuned on CPU, eager on CUDA.
    decoder: what decodes the stored JPEG thumbnails. `pillow` on the host
    (the CPU path, and a last resort on CUDA), `nvjpeg` (torchvision's nvJPEG
    decode into GPU memory), `nvimgcodec` (NVIDIA's nvImageCodec, batched, using
    the hardware JPEG engines where the GPU has them; needs the optional
    `nvidia-nvimgcodec-cu13[nvjpeg]` package). `auto` takes the best one that
    works on the device (nvimgcodec, then nvjpeg, then pillow on CUDA; pillow on
    CPU) and records why it skipped any; a named one that cannot work is an error.
    """

    weights: str
    device: str = "auto"
    batch_size: int | None = None
    model: str = "resnet50"
    precision: str = "auto"
    compile: bool | None = None
    runtime: str = "auto"
    decoder: str = "auto"

    def __post_init__(self) -> None:
        if not self.weights.strip():
            raise ModelConfigError("model weights setting is empty; use DEFAULT, a state-dict path or 'random'")
        if self.batch_size is not None and self.batch_size < 1:
            raise ModelConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.model not in BACKBONES:
            raise ModelConfigError(f"unknown model {self.model!r}; choose one of {BACKBONES}")
        _check_weights_form(self.model, self.weights)
        if self.precision not in PRECISIONS:
            raise ModelConfigError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if self.runtime not in RUNTIMES:
            raise ModelConfigError(f"unknown runtime {self.runtime!r}; choose one of {RUNTIMES}")
        if not _DEVICE_PATTERN.fullmatch(self.device):
            raise ModelConfigError(f"unsupported device {self.device!r}; use auto, cpu, cuda or cuda:N")
        if self.decoder not in DECODERS:
            raise ModelConfigError(f"unknown decoder {self.decoder!r}; choose one of {DECODERS}")
        if self.device == "cpu" and self.decoder in GPU_DECODERS:
            raise ModelConfigError(f"decoder {self.decoder!r} decodes into GPU memory; use pillow or auto on CPU")

    @property
    def width(self) -> int:
        """The width of the vectors this model writes: known without building the model, so stored vectors
        of another width are never reused."""
        width = BACKBONE_SPECS[self.model].width
        return width if width is not None else read_checkpoint_dir(Path(self.weights)).width


def _check_weights_form(model: str, weights: str) -> None:
    """A checkpoint folder for the model that takes its architecture from one, and for no other."""
    folder = Path(weights).is_dir()
    if BACKBONE_SPECS[model].architecture is None and not folder:
        raise ModelConfigError(
            f"{model} takes its architecture from an open_clip checkpoint folder; {weights!r} is not a folder"
        )
    if BACKBONE_SPECS[model].architecture is not None and folder:
        raise ModelConfigError(
            f"{weights} is a folder: use model open_clip_dir for an open_clip checkpoint folder, or the path of a file"
        )


def parse_random_seed(weights: str) -> int | None:
    """The seed of a `random` / `random:<seed>` weights setting, or None for any other setting."""
    head, _, seed = weights.partition(":")
    if head.lower() != RANDOM_WEIGHTS:
        return None
    if not seed:
        return 0
    if not seed.isdigit():
        raise ModelConfigError(f"random weights seed must be a non-negative integer, got {seed!r}")
    return int(seed)


_RANDOM_IDENTITY_PREFIX: Final = "random-seed"


def model_id_has_random_weights(model_id: str) -> bool:
    """Whether a recorded `model_id` (`<library>/<model>/<weights identity>/<numerics>`) names random weights."""
    parts = model_id.split("/")
    return len(parts) > 2 and parts[2].startswith(_RANDOM_IDENTITY_PREFIX)


def backbone_of_model_id(model_id: str) -> str | None:
    """The backbone name a recorded `model_id` was written by (its second part), None when it has none."""
    parts = model_id.split("/")
    return parts[1] if len(parts) > 1 else None


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights setting resolved once (a state-dict file hashed once): what it names and how to load it.

    `identity` is `random-seed<N>`, `state-dict-sha256-<16 hex>` of the file's
    content, `checkpoint-sha256-<16 hex>` of a checkpoint folder's config and
    weights file together, or the pretrained weights name as written (each
    family names `DEFAULT` in the model_id: `weights_id` in backbones/).
    """

    kind: Literal["random", "state_dict", "checkpoint_dir", "pretrained"]
    identity: str
    seed: int | None = None
    path: Path | None = None  # the state-dict file or the checkpoint folder
    name: str | None = None
    checkpoint: CheckpointDir | None = None  # the checkpoint folder as read


def resolve_weights(weights: str) -> ResolvedWeights:
    seed = parse_random_seed(weights)
    if seed is not None:
        return ResolvedWeights("random", f"{_RANDOM_IDENTITY_PREFIX}{seed}", seed=seed)
    path = Path(weights)
    if path.is_file():
        return ResolvedWeights("state_dict", f"state-dict-sha256-{sha256_prefix(path)}", path=path)
    if path.is_dir():
        checkpoint = read_checkpoint_dir(path)
        return ResolvedWeights("checkpoint_dir", checkpoint_identity(checkpoint), path=path, checkpoint=checkpoint)
    return ResolvedWeights("pretrained", weights, name=weights)


def checkpoint_identity(checkpoint: CheckpointDir) -> str:
    """`checkpoint-sha256-<16 hex>` of a checkpoint folder's config and weights file: changing either changes it.

    One open_clip checkpoint holds both towers, so the id names the text tower's weights too.
    """
    parts = [checkpoint.folder / CHECKPOINT_CONFIG_FILE, checkpoint.weights_file]
    named = "\0".join(f"{path.name}:{sha256_prefix(path)}" for path in parts)
    return f"checkpoint-sha256-{hashlib.sha256(named.encode()).hexdigest()[:16]}"


def model_code_version(model: str, weights: str) -> str:
    """The Dagster code version of what the model writes: the backbone and the weights' identity.

    Known when the code location loads, without importing torch, so the UI marks
    partitions embedded with other weights (or another backbone) stale. The
    arithmetic (precision, device) is left to `model_id`, which decides reuse.
    A CLIP's weights are one checkpoint for both towers, so the version changes
    when either tower's weights do; its `DEFAULT` is named by the tag it means
    (`BackboneSpec.pretrained_weights_id`), torchvision's is kept as written.
    """
    resolved = resolve_weights(weights)
    spec = BACKBONE_SPECS.get(model)
    if resolved.kind == "pretrained" and spec is not None:
        return f"{model}/{spec.pretrained_weights_id(weights) or resolved.identity}"
    return f"{model}/{resolved.identity}"


def sha256_prefix(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]
