"""Backbones ready for inference: built by their family (core/embedding/backbones/), named, placed on a device, tuned, compiled.

A CLIP's image tower is built here like any backbone; its text tower is built on its own by text_encoder.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Final, assert_never

import torch

from imgemb_assets.core.embedding.allocator import keep_inference_memory_mapped
from imgemb_assets.core.embedding.backbones.family import BackboneFamily
from imgemb_assets.core.embedding.backbones.specs import (
    BACKBONE_SPECS,
    IMAGENET_AT_THUMBNAIL_SIZE,
    BackboneSpec,
    Preprocessing,
)
from imgemb_assets.core.embedding.model_settings import (
    CPU_BATCH_SIZE,
    GPU_BATCH_SIZE,
    EmbeddingSettings,
    ModelConfigError,
    ResolvedWeights,
    resolve_weights,
)
from imgemb_assets.core.embedding.thumbnail_decoders import PillowDecoder, ThumbnailDecoder, choose_decoder

_log = logging.getLogger(__name__)


# CUDA graphs for the one batch shape the pipeline feeds (a partial batch is padded
# to it), so a forward pass costs no per-kernel launches; a CPU has no graphs to capture.
COMPILE_MODES: Final = {"cuda": "reduce-overhead", "cpu": "default"}
# Calls until a compiled forward is in its steady state: the first compiles (and, under
# CUDA graphs, warms up), the second records the graph; later ones replay it.
_CALLS_TO_STEADY_STATE: Final = {"reduce-overhead": 2, "default": 1}
_MAX_FAILURE_CHARS: Final = 500


class CompiledForward:
    """The module through torch.compile for one fixed batch shape, compiled on first use, its compile timed.

    Every call takes exactly `batch_size` rows: the caller pads a partial batch
    (`embedding.pad_batch`) and drops the padding rows' vectors. Compiling costs
    tens of seconds on a GPU (`compile_seconds` records it; a persistent
    TORCHINDUCTOR_CACHE_DIR shortens the next process's), so it starts only at a
    call of at least one full batch (`worth_using`): a one-image query stays eager.
    A compile that fails (Triton without a C compiler on a slim image, say) stops
    the step when compile was asked for explicitly (`required`); under the default
    the model stays eager and `failure` says why.
    """

    def __init__(self, module: torch.nn.Module, batch_size: int, device: torch.device, required: bool) -> None:
        self.mode = COMPILE_MODES[device.type]
        self.batch_size = batch_size
        self.required = required
        self.compile_seconds: float | None = None  # compile and warm-up, until the first steady-state call
        self.failure: str | None = None
        self._eager = module
        self._compiled = torch.compile(module, mode=self.mode, dynamic=False, fullgraph=True)

    def worth_using(self, images: int) -> bool:
        """Whether a call embedding `images` thumbnails should go through the compiled module."""
        if self.failure is not None:
            return False
        return self.compile_seconds is not None or images >= self.batch_size

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] != self.batch_size:
            raise ValueError(f"the compiled forward takes batches of {self.batch_size} rows, not {batch.shape[0]}")
        if self.failure is not None:
            return self._eager(batch)
        if self.compile_seconds is None:
            return self._first_call(batch)
        # A clone: under CUDA graphs the output lives in the graph's memory pool, which
        # the next replay overwrites while the caller may still hold this batch's vectors.
        return self._compiled(batch).clone()

    def _first_call(self, batch: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        try:
            for _ in range(_CALLS_TO_STEADY_STATE[self.mode]):
                out = self._compiled(batch)
            if batch.device.type == "cuda":
                torch.cuda.synchronize(batch.device)
        except Exception as exc:  # dynamo, inductor and Triton fail with many types
            reason = f"{type(exc).__name__}: {exc}"[:_MAX_FAILURE_CHARS]
            if self.required:
                raise ModelConfigError(f"torch.compile of the model failed: {reason}") from exc
            self.failure = reason
            _log.warning("torch.compile failed, the model runs eager: %s", reason)
            return self._eager(batch)
        self.compile_seconds = time.perf_counter() - started
        return out.clone()


@dataclass(frozen=True)
class EmbeddingModel:
    module: torch.nn.Module  # the eager module (channels_last on CUDA and under cpu-tuned)
    model_id: str  # recorded on every embedding row
    weights_description: str  # for people: where the weights came from
    is_random: bool
    device: torch.device
    dtype: torch.dtype
    width: int
    batch_size: int
    runtime: str = "eager"  # the resolved runtime: eager or cpu-tuned (see EmbeddingSettings.runtime)
    preprocessing: Preprocessing = IMAGENET_AT_THUMBNAIL_SIZE  # what the backbone's input needs (see backbones.specs)
    decoder: ThumbnailDecoder = field(default_factory=PillowDecoder)  # decodes the stored thumbnails
    decoder_note: str = ""  # why `auto` skipped a better decoder; empty when it got the best for the device
    compiled: CompiledForward | None = None  # None when compile is off
    # Whether the same weights embed text (a CLIP): text_encoder.load_text_encoder builds that tower on its own.
    has_text_tower: bool = False

    def runtime_metadata(self) -> dict[str, str | float | bool | None]:
        """What decodes and whether, how and at what cost the model was compiled: for step metadata and benchmarks."""
        compiled = self.compiled
        ran: dict[str, str | float | bool | None] = {"decoder": self.decoder.name, "decoder_note": self.decoder_note}
        if compiled is None:
            return ran | {"compiled": False}
        seconds = None if compiled.compile_seconds is None else round(compiled.compile_seconds, 2)
        return ran | {
            "compiled": compiled.failure is None and seconds is not None,
            "compile_mode": compiled.mode,
            "compile_s": seconds,  # None: no call has been large enough to compile yet
            "compile_failure": compiled.failure,
        }


def resolve_device(name: str) -> torch.device:
    """A validated device setting (see EmbeddingSettings) as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise ModelConfigError("fp16 needs a CUDA device; use fp32 (or bf16) on CPU")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """A validated runtime setting for this device: `auto` is cpu-tuned on CPU and eager elsewhere.

    cpu-tuned on CUDA is eager: the CUDA path already runs channels_last and
    its allocator is torch's caching allocator, which glibc tuning cannot help.
    """
    if device.type != "cpu":
        return "eager"
    return "cpu-tuned" if runtime == "auto" else runtime


def resolve_compile(compile_setting: bool | None, device: torch.device) -> bool:
    """Whether to compile: as set, or by default on CUDA only.

    On CUDA the compiled model ran ResNet50 at 24.1k img/s against 13.8k eager
    (H100, fp16, batch 256). On a CPU it is left off: inductor's C++ build takes
    20 s or more on a small machine, and cpu-tuned is the measured CPU path.
    """
    if compile_setting is None:
        return device.type == "cuda"
    return compile_setting


def model_id_for(settings: EmbeddingSettings, weights: ResolvedWeights | None = None) -> str:
    """The id recorded on every embedding row, known without building the model.

    Stored vectors are reused only under the same id, so it names everything that
    moves a vector past the project's 2e-3 relative tolerance: the backbone, the
    weights (a state-dict file by its content) and the arithmetic (`numerics_tag`).
    Ids written before the arithmetic was part of them (`torchvision/<model>/<weights>`)
    match none, so those vectors are recomputed once. Pass the `weights` already
    resolved from `settings.weights` so a state-dict file is not hashed again.
    """
    weights = weights or resolve_weights(settings.weights)
    spec = BACKBONE_SPECS[settings.model]
    weights_id = family_of(spec).weights_id(spec, weights)  # DEFAULT is resolved to the weights it means
    device = resolve_device(settings.device)
    numerics = numerics_tag(resolve_dtype(settings.precision, device), device)
    return f"{spec.library}/{settings.model}/{weights_id}/{numerics}"


def numerics_tag(dtype: torch.dtype, device: torch.device) -> str:
    """The arithmetic a vector was computed with, as far as it changes the vector's values.

    Measured against CPU fp32 (max |difference| / max |reference|, 64 thumbnails,
    random weights, H100): fp16 on CUDA 6e-4 to 1.6e-3 by backbone, bf16 3.5e-3 to
    1.4e-2, and bf16 on CPU differs from bf16 on CUDA by up to 1.8e-2, so bf16 names
    its device. fp32 is the same on both (2e-6) once CUDA is kept off TF32
    (`full_fp32_on_cuda`). Neither the runtime (eager and cpu-tuned are
    5e-7 apart), the batch size (a compiled model's padded last batch included),
    torch.compile (1.4e-3 at fp16) nor the thumbnail decoder is part of it:
    nvImageCodec's CPU backend gives Pillow's pixels exactly on stored thumbnails,
    and bench/gpu_check.py measures the GPU decoders' vectors against fp32 CPU.
    """
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    return f"{name}-{device.type}" if dtype == torch.bfloat16 else name


def require_width(settings: EmbeddingSettings, width: int, what: str) -> None:
    """ModelConfigError unless a built tower's vectors have the width the settings (and the table) expect."""
    if width != settings.width:
        raise ModelConfigError(f"{what} gives vectors of width {width}, not {settings.width}")


def placement(settings: EmbeddingSettings) -> tuple[torch.device, torch.dtype]:
    """Where and at what precision a tower of these settings runs (fp32 on CUDA kept off TF32, as ids assume)."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.precision, device)
    if device.type == "cuda" and dtype == torch.float32:
        full_fp32_on_cuda()
    return device, dtype


def load_model(settings: EmbeddingSettings, weights: ResolvedWeights | None = None) -> EmbeddingModel:
    """The backbone without its classifier, with the configured weights (resolved once), ready for inference."""
    spec = BACKBONE_SPECS[settings.model]
    weights = weights or resolve_weights(settings.weights)
    built = family_of(spec).create_model_and_preprocessing(spec, weights)
    require_width(settings, built.width, f"{settings.model} without its classifier")
    device, dtype = placement(settings)
    module = built.module.eval().to(device=device, dtype=dtype)
    runtime = resolve_runtime(settings.runtime, device)
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    elif runtime == "cpu-tuned":
        module = _tune_for_cpu(module)
    batch_size = settings.batch_size or (GPU_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE)
    compiled = None
    if resolve_compile(settings.compile, device):
        compiled = CompiledForward(module, batch_size, device, required=settings.compile is True)
    decoding = choose_decoder(settings.decoder, device)
    return EmbeddingModel(
        module=module,
        model_id=model_id_for(settings, weights),
        weights_description=built.weights_description,
        is_random=weights.kind == "random",
        device=device,
        dtype=dtype,
        width=built.width,
        batch_size=batch_size,
        runtime=runtime,
        preprocessing=built.preprocessing,
        decoder=decoding.decoder,
        decoder_note=decoding.note,
        compiled=compiled,
        has_text_tower=spec.text_tower,
    )


def full_fp32_on_cuda() -> None:
    """fp32 on CUDA computes in fp32, so its vectors are those of fp32 on CPU (and share its model_id).

    cuDNN runs fp32 convolutions in TF32 by default, which moved ResNet50 vectors
    by 8.6e-4 (relative, H100) from the CPU's; with TF32 off they agree to 2e-6.
    The switch is process-wide: the embedding step is this process's only torch user.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _tune_for_cpu(module: torch.nn.Module) -> torch.nn.Module:
    """The same weights in channels_last, with this process's malloc told to keep freed activation buffers mapped.

    Two measured changes, neither moving a vector past the 1e-5 bar:
    - malloc: no page-fault storm when glibc unmaps and re-faults the big
      activation buffers each forward pass (measured up to ~1.2 million faults
      per 64 images and 2-3x slower on a loaded 2-core machine; see
      core/embedding/allocator.py). Bit-identical.
    - channels_last: oneDNN's NHWC convolutions, 1.16-1.19x the images/s of
      contiguous tensors on the 2-core machine with torch 2.14 (batch 16,
      malloc tuned both sides). The summation order changes, so vectors move
      by 5e-7 relative to eager: inside the 1e-5 bar and far inside the 2e-3
      that would call for its own model_id.
    Measured alternatives that change the arithmetic more (TorchScript freeze +
    optimize_for_inference, ONNX Runtime: BN folded into the convolutions) miss
    the 1e-5 bar on realistic weights (~1.9e-5), cost 12-26 s to build per run,
    2.5-3x the memory, for at most 1.14x.
    """
    keep_inference_memory_mapped()
    return module.to(memory_format=torch.channels_last)


def family_of(spec: BackboneSpec) -> BackboneFamily:
    """The module that builds this backbone's family, imported only when a backbone of it is used."""
    match spec.family:
        case "resnet":
            from imgemb_assets.core.embedding.backbones import resnet

            return resnet
        case "vit":
            from imgemb_assets.core.embedding.backbones import vit

            return vit
        case "clip":
            from imgemb_assets.core.embedding.backbones import clip

            return clip
        case _:
            assert_never(spec.family)
