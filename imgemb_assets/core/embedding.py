"""Embedding stored 224x224 JPEG thumbnails: preprocessing, overlapped decode and inference, partitions.

Preprocessing is the article's `ToTensor` + ImageNet `Normalize`, done on whole
uint8 batches on the model's device with the same fp32 arithmetic, then cast
to the model's precision.

Decoding never waits for the model and the model never waits for decoding:
on CPU a thread pool decodes the next batches with Pillow while the current
one runs; on CUDA, nvJPEG decodes the next batch on a side stream while the
current one runs, results come back through pinned host buffers, and the host
synchronizes one batch behind.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from imgemb_assets.core.images import IMAGE_SIZE, decode_thumbnail
from imgemb_assets.core.model_config import EmbeddingSettings
from imgemb_assets.core.models import EmbeddingModel, load_model, model_id_for
from imgemb_assets.core.tables import EMBEDDING_TYPE

IMAGENET_MEAN: Final = (0.485, 0.456, 0.406)
IMAGENET_STD: Final = (0.229, 0.224, 0.225)
_CPU_DECODE_AHEAD: Final = 2  # batches decoded ahead of the model on CPU


def preprocess(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> normalized `dtype`, as `ToTensor` then ImageNet `Normalize` (in fp32)."""
    images = pixels.to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
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
        return model.module(preprocess(pixels.to(model.device, non_blocking=True), model.dtype))


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

    in_flight: deque[tuple[torch.Tensor, torch.cuda.Event]] = deque()
    upcoming = decode_on_side_stream(batches[0]) if batches else None
    for index in range(len(batches)):
        assert upcoming is not None
        pixels, ready = upcoming
        compute.wait_event(ready)
        pixels.record_stream(compute)
        # Queue the next decode before this batch's forward pass, so they overlap.
        upcoming = decode_on_side_stream(batches[index + 1]) if index + 1 < len(batches) else None
        with torch.inference_mode():
            vectors = model.module(preprocess(pixels, model.dtype)).float()
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


@dataclass
class EmbeddingRun:
    """What embedding a partition took; filled in while its batches stream through."""

    images_embedded: int = 0  # went through the model
    images_reused: int = 0  # kept their stored vector
    seconds: float = 0.0  # decoding and inference of the embedded images
    model: EmbeddingModel | None = None  # None while every vector was reused and no model was needed

    @property
    def images_per_second(self) -> float:
        return self.images_embedded / self.seconds if self.seconds > 0 else 0.0


def embed_partition_batches(
    joined: Iterable[pa.RecordBatch],
    previous: pa.Table | None,
    settings: EmbeddingSettings,
    schema: pa.Schema,
    run: EmbeddingRun,
) -> Iterator[pa.RecordBatch]:
    """The joined rows, batch by batch, with their image replaced by its embedding and the model's id.

    A row whose image_id, content fingerprint (etag) and model_id match a row of
    `previous` (the partition as stored) keeps that vector; only new or changed
    images go through the model, which is loaded only when the first one comes.
    """
    model_id = model_id_for(settings)
    stored = _stored_vectors(previous, model_id)
    for batch in joined:
        if batch.num_rows == 0:
            continue
        keys = list(zip(batch.column("image_id").to_pylist(), batch.column("etag").to_pylist()))
        to_embed = [row for row, key in enumerate(keys) if key not in stored.index]
        reused = [row for row, key in enumerate(keys) if key in stored.index]
        if to_embed and run.model is None:
            run.model = load_model(settings)
        width = run.model.width if run.model else stored.vectors.shape[1]
        vectors = np.empty((batch.num_rows, width), dtype=np.float32)
        if to_embed:
            assert run.model is not None
            started = time.perf_counter()
            vectors[to_embed] = embed_thumbnails(run.model, batch.column("image_jpeg").take(pa.array(to_embed)).to_pylist())
            run.seconds += time.perf_counter() - started
        if reused:
            vectors[reused] = stored.vectors[[stored.index[keys[row]] for row in reused]]
        run.images_embedded += len(to_embed)
        run.images_reused += len(reused)
        table = (
            pa.Table.from_batches([batch])
            .append_column("embedding", embedding_array(vectors))
            .append_column("model_id", pa.array([model_id] * batch.num_rows, pa.string()))
        )
        yield from table.select(schema.names).cast(schema).to_batches()


@dataclass(frozen=True)
class _StoredVectors:
    index: dict[tuple[str, str], int]  # (image_id, etag) -> row of `vectors`
    vectors: np.ndarray


def _stored_vectors(previous: pa.Table | None, model_id: str) -> _StoredVectors:
    if previous is None or previous.num_rows == 0:
        return _StoredVectors({}, np.empty((0, 0), np.float32))
    same_model = previous.filter(pc.equal(previous.column("model_id"), model_id))
    if same_model.num_rows == 0:
        return _StoredVectors({}, np.empty((0, 0), np.float32))
    embeddings = same_model.column("embedding").combine_chunks()
    width = len(embeddings[0])
    vectors = embeddings.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    keys = zip(same_model.column("image_id").to_pylist(), same_model.column("etag").to_pylist())
    return _StoredVectors({key: row for row, key in enumerate(keys)}, vectors)


def embedding_array(vectors: np.ndarray) -> pa.Array:
    """(N, width) float32 -> list<float32>; Delta has no fixed-size list type."""
    width = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel(), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, width).cast(EMBEDDING_TYPE)
