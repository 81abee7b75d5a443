"""Embedding stored 224x224 JPEG thumbnails: preprocessing, and decoding overlapped with inference.

Needs torch, numpy and Pillow only (no pyarrow, no Dagster), so it runs and
benchmarks on a bare GPU machine.

Preprocessing is the article's `ToTensor` + `Normalize` with the backbone's own
normalization (`EmbeddingModel.preprocessing`: ImageNet's for torchvision's
backbones), done on whole uint8 batches on the model's device with the same fp32
arithmetic, then cast to the model's precision.

Decoding never waits for the model and the model never waits for decoding:
on CPU a thread pool decodes the next batches with Pillow while the current
one runs; on CUDA, a thread has the model's decoder (`thumbnail_decoders`:
nvImageCodec, torchvision's nvJPEG, or Pillow as a last resort) decode the next
batches on a side stream while the current one runs, results come back through
pinned host buffers, and the host synchronizes one batch behind.

A compiled model (`models.CompiledForward`) takes one fixed batch shape: a
partial batch is padded with zero pixels to it and the padding rows' vectors
are dropped, so every row's vector is what it would be in a full batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Final

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as image_functional

from imgemb_assets.core.embedding.backbones.specs import IMAGENET_AT_THUMBNAIL_SIZE, Preprocessing
from imgemb_assets.core.embedding.models import CompiledForward, EmbeddingModel

# decode_batch is re-exported: the CPU path's Pillow decode, which tests and benchmarks call by this name.
from imgemb_assets.core.embedding.thumbnail_decoders import DecodedBatch
from imgemb_assets.core.embedding.thumbnail_decoders import decode_batch as decode_batch
from imgemb_assets.core.imaging.images import IMAGE_SIZE

_CPU_DECODE_AHEAD: Final = 2  # batches decoded ahead of the model on CPU
_CUDA_DECODE_AHEAD: Final = 2  # batches the GPU decoder decodes ahead of the model on CUDA
_INTERPOLATIONS: Final = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def preprocess(
    pixels: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    preprocessing: Preprocessing = IMAGENET_AT_THUMBNAIL_SIZE,
) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> normalized `dtype`, as `ToTensor` then `Normalize` (in fp32) with the backbone's normalization.

    Thumbnails of another size than the backbone's input (a CLIP trained at 32 or
    336 px, say) are first resized to it, antialiased, with the backbone's
    interpolation, and rounded back to uint8 as open_clip's PIL resize does (the
    values are within rounding of PIL's, not identical). At the input size they
    are used as they are: no resize, so no change to any 224 px backbone's vectors.
    """
    size = preprocessing.input_size
    if tuple(pixels.shape[-2:]) != (size, size):
        pixels = image_functional.resize(
            pixels, [size, size], interpolation=_INTERPOLATIONS[preprocessing.interpolation], antialias=True
        )
    normalization = preprocessing.normalization
    images = pixels.to(torch.float32).div(255)
    mean = torch.tensor(normalization.mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(normalization.std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    normalized = images.sub(mean).div(std)
    if normalized.device.type == "cuda":
        return normalized.to(dtype=dtype, memory_format=torch.channels_last)
    return normalized.to(dtype)


def pad_batch(pixels: torch.Tensor, rows: int) -> torch.Tensor:
    """`pixels` with zero-pixel rows appended up to `rows` (unchanged when it has as many)."""
    missing = rows - pixels.shape[0]
    if missing <= 0:
        return pixels
    return torch.cat([pixels, pixels.new_zeros((missing, *pixels.shape[1:]))])


def run_model(model: EmbeddingModel, pixels: torch.Tensor) -> torch.Tensor:
    """Vectors of uint8 `pixels` through the eager module."""
    with torch.inference_mode():
        return model.module(preprocess(pixels.to(model.device, non_blocking=True), model.dtype, model.preprocessing))


def compiled_batch(model: EmbeddingModel, compiled: CompiledForward, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 `pixels` as the compiled module takes them: padded to its batch shape, normalized, channels_last.

    One layout for every batch (Pillow's come as NHWC views, a padded one as NCHW):
    the compiled graph is specialised to its input's strides and would compile again.
    """
    padded = pad_batch(pixels.to(model.device, non_blocking=True), compiled.batch_size)
    return preprocess(padded, model.dtype, model.preprocessing).contiguous(memory_format=torch.channels_last)


def run_compiled(model: EmbeddingModel, compiled: CompiledForward, pixels: torch.Tensor) -> torch.Tensor:
    """Vectors of uint8 `pixels` through the compiled module, the padding rows dropped."""
    with torch.inference_mode():
        return compiled(compiled_batch(model, compiled, pixels))[: pixels.shape[0]]


def forward_for(model: EmbeddingModel, images: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward pass a call embedding `images` thumbnails runs: compiled where it pays (see CompiledForward).

    A compile that is due happens here, on a batch of zero pixels, before the caller
    starts its decode thread: CUDA graphs are then captured while no other thread of
    this pipeline is issuing CUDA work.
    """
    compiled = model.compiled
    if compiled is None or not compiled.worth_using(images):
        return partial(run_model, model)
    if compiled.compile_seconds is None:
        run_compiled(
            model, compiled, torch.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, device=model.device)
        )
        if compiled.failure is not None:
            return partial(run_model, model)
    return partial(run_compiled, model, compiled)


def iter_embeddings(model: EmbeddingModel, jpegs: Sequence[bytes]) -> Iterator[np.ndarray]:
    """(n, width) float32 embeddings of consecutive batches of `jpegs`, in order."""
    batches = [jpegs[start : start + model.batch_size] for start in range(0, len(jpegs), model.batch_size)]
    forward = forward_for(model, len(jpegs))
    if model.device.type == "cuda":
        yield from _iter_embeddings_cuda(model, batches, forward)
    else:
        yield from _iter_embeddings_cpu(model, batches, forward)


def embed_thumbnails(model: EmbeddingModel, jpegs: Sequence[bytes]) -> np.ndarray:
    """Embeddings of stored JPEG thumbnails, in input order, as (N, width) float32."""
    out = np.empty((len(jpegs), model.width), dtype=np.float32)
    start = 0
    for vectors in iter_embeddings(model, jpegs):
        out[start : start + len(vectors)] = vectors
        start += len(vectors)
    return out


Forward = Callable[[torch.Tensor], torch.Tensor]


def _iter_embeddings_cpu(
    model: EmbeddingModel, batches: list[Sequence[bytes]], forward: Forward
) -> Iterator[np.ndarray]:
    decode = model.decoder.decode
    with ThreadPoolExecutor(max_workers=_CPU_DECODE_AHEAD) as pool:
        pending: deque[Future[DecodedBatch]] = deque(pool.submit(decode, b) for b in batches[:_CPU_DECODE_AHEAD])
        for following in [*batches[_CPU_DECODE_AHEAD:], *([None] * len(pending))]:
            decoded = pending.popleft().result()
            if following is not None:
                pending.append(pool.submit(decode, following))
            yield forward(decoded.pixels).float().numpy()


def _iter_embeddings_cuda(
    model: EmbeddingModel, batches: list[Sequence[bytes]], forward: Forward
) -> Iterator[np.ndarray]:
    compute = torch.cuda.current_stream(model.device)
    decode_stream = torch.cuda.Stream(model.device)

    def decode_on_side_stream(jpegs: Sequence[bytes]) -> tuple[DecodedBatch, torch.cuda.Event]:
        with torch.cuda.stream(decode_stream):
            decoded = model.decoder.decode(jpegs)
            ready = torch.cuda.Event()
            ready.record(decode_stream)
        return decoded, ready

    # GPU decoders still do part of their work on the host (torchvision's nvJPEG about
    # 90% of a thumbnail's decode on an H100), so decoding runs in its own thread and
    # this one only launches the model: otherwise the GPU idles during each decode.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"decode-{model.decoder.name}") as pool:
        pending = deque(pool.submit(decode_on_side_stream, b) for b in batches[:_CUDA_DECODE_AHEAD])
        # Each decoded batch stays here until its vectors are back on the host, so the
        # library buffers it was copied from outlive every kernel that read them.
        in_flight: deque[tuple[torch.Tensor, torch.cuda.Event, DecodedBatch]] = deque()
        for following in [*batches[_CUDA_DECODE_AHEAD:], *([None] * len(pending))]:
            decoded, ready = pending.popleft().result()
            if following is not None:
                pending.append(pool.submit(decode_on_side_stream, following))
            compute.wait_event(ready)
            decoded.pixels.record_stream(compute)
            vectors = forward(decoded.pixels).float()
            host = torch.empty(vectors.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(vectors, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(compute)
            in_flight.append((host, copied, decoded))
            if len(in_flight) > 1:  # hand back the previous batch: the host stays one batch behind
                yield _when_copied(*in_flight.popleft())
        while in_flight:
            yield _when_copied(*in_flight.popleft())


def _when_copied(host: torch.Tensor, copied: torch.cuda.Event, _decoded: DecodedBatch) -> np.ndarray:
    copied.synchronize()
    return host.numpy()
