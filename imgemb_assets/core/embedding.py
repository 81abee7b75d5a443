"""Embedding stored 224x224 JPEG thumbnails: preprocessing, and decoding overlapped with inference.

Needs torch, numpy and Pillow only (no pyarrow, no Dagster), so it runs and
benchmarks on a bare GPU machine.

Preprocessing is the article's `ToTensor` + `Normalize` with the backbone's own
normalization (`EmbeddingModel.normalization`: ImageNet's for torchvision's
backbones), done on whole uint8 batches on the model's device with the same fp32
arithmetic, then cast to the model's precision.

Decoding never waits for the model and the model never waits for decoding:
on CPU a thread pool decodes the next batches with Pillow while the current
one runs; on CUDA, a thread has nvJPEG decode the next batches on a side stream
while the current one runs, results come back through pinned host buffers, and
the host synchronizes one batch behind.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

import numpy as np
import torch

from imgemb_assets.core.images import IMAGE_SIZE, decode_thumbnail
from imgemb_assets.core.models import IMAGENET_NORMALIZATION, EmbeddingModel, Normalization

_CPU_DECODE_AHEAD: Final = 2  # batches decoded ahead of the model on CPU
_CUDA_DECODE_AHEAD: Final = 2  # batches nvJPEG decodes ahead of the model on CUDA


def preprocess(
    pixels: torch.Tensor, dtype: torch.dtype = torch.float32, normalization: Normalization = IMAGENET_NORMALIZATION
) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> normalized `dtype`, as `ToTensor` then `Normalize` (in fp32)."""
    images = pixels.to(torch.float32).div(255)
    mean = torch.tensor(normalization.mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(normalization.std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    normalized = images.sub(mean).div(std)
    if normalized.device.type == "cuda":
        return normalized.to(dtype=dtype, memory_format=torch.channels_last)
    return normalized.to(dtype)


def decode_batch(jpegs: Sequence[bytes]) -> torch.Tensor:
    """Thumbnails decoded with Pillow into one (N, 3, 224, 224) uint8 tensor."""
    batch = np.empty((len(jpegs), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for index, jpeg in enumerate(jpegs):
        batch[index] = decode_thumbnail(jpeg)
    return torch.from_numpy(batch).permute(0, 3, 1, 2)


def run_model(model: EmbeddingModel, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.module(preprocess(pixels.to(model.device, non_blocking=True), model.dtype, model.normalization))


def iter_embeddings(model: EmbeddingModel, jpegs: Sequence[bytes]) -> Iterator[np.ndarray]:
    """(n, width) float32 embeddings of consecutive batches of `jpegs`, in order."""
    batches = [jpegs[start : start + model.batch_size] for start in range(0, len(jpegs), model.batch_size)]
    if model.device.type == "cuda":
        yield from _iter_embeddings_cuda(model, batches)
    else:
        yield from _iter_embeddings_cpu(model, batches)


def embed_thumbnails(model: EmbeddingModel, jpegs: Sequence[bytes]) -> np.ndarray:
    """Embeddings of stored JPEG thumbnails, in input order, as (N, width) float32."""
    out = np.empty((len(jpegs), model.width), dtype=np.float32)
    start = 0
    for vectors in iter_embeddings(model, jpegs):
        out[start : start + len(vectors)] = vectors
        start += len(vectors)
    return out


def _iter_embeddings_cpu(model: EmbeddingModel, batches: list[Sequence[bytes]]) -> Iterator[np.ndarray]:
    with ThreadPoolExecutor(max_workers=_CPU_DECODE_AHEAD) as pool:
        pending: deque[Future[torch.Tensor]] = deque(pool.submit(decode_batch, b) for b in batches[:_CPU_DECODE_AHEAD])
        for following in [*batches[_CPU_DECODE_AHEAD:], *([None] * len(pending))]:
            pixels = pending.popleft().result()
            if following is not None:
                pending.append(pool.submit(decode_batch, following))
            yield run_model(model, pixels).float().numpy()


def _iter_embeddings_cuda(model: EmbeddingModel, batches: list[Sequence[bytes]]) -> Iterator[np.ndarray]:
    from torchvision.io import ImageReadMode, decode_jpeg

    compute = torch.cuda.current_stream(model.device)
    decode_stream = torch.cuda.Stream(model.device)

    def decode_on_side_stream(jpegs: Sequence[bytes]) -> tuple[torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(decode_stream):
            data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
            pixels = torch.stack(decode_jpeg(data, mode=ImageReadMode.RGB, device=model.device))
            ready = torch.cuda.Event()
            ready.record(decode_stream)
        return pixels, ready

    # nvJPEG decodes 224x224 thumbnails' entropy-coded data on the host (about 90%
    # of a decode's wall time on an H100), so decoding runs in its own thread and
    # this one only launches the model: otherwise the GPU idles during each decode.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvjpeg") as pool:
        pending = deque(pool.submit(decode_on_side_stream, b) for b in batches[:_CUDA_DECODE_AHEAD])
        in_flight: deque[tuple[torch.Tensor, torch.cuda.Event]] = deque()
        for following in [*batches[_CUDA_DECODE_AHEAD:], *([None] * len(pending))]:
            pixels, ready = pending.popleft().result()
            if following is not None:
                pending.append(pool.submit(decode_on_side_stream, following))
            compute.wait_event(ready)
            pixels.record_stream(compute)
            with torch.inference_mode():
                vectors = model.module(preprocess(pixels, model.dtype, model.normalization)).float()
            host = torch.empty(vectors.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(vectors, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(compute)
            in_flight.append((host, copied))
            if len(in_flight) > 1:  # hand back the previous batch: the host stays one batch behind
                yield _when_copied(*in_flight.popleft())
        while in_flight:
            yield _when_copied(*in_flight.popleft())


def _when_copied(host: torch.Tensor, copied: torch.cuda.Event) -> np.ndarray:
    copied.synchronize()
    return host.numpy()
