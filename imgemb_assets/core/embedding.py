"""The embedding model and its preprocessing, which travel together.

The model is torchvision's ResNet50 with its classifier replaced by Identity, in
eval mode under inference_mode. Preprocessing is the article's `ToTensor` +
ImageNet `Normalize` on the 224x224 RGB thumbnail, done on whole uint8 batches
with the same arithmetic, so results match the per-image transform.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchvision.models import ResNet50_Weights, resnet50

from imgemb_assets.core.images import decode_thumbnail
from imgemb_assets.core.model_config import RANDOM_WEIGHTS, EmbeddingSettings, ModelConfigError, parse_random_seed
from imgemb_assets.core.tables import EMBEDDING_TYPE

IMAGENET_MEAN: Final = (0.485, 0.456, 0.406)
IMAGENET_STD: Final = (0.229, 0.224, 0.225)
_MODEL_NAME: Final = "resnet50"


@dataclass(frozen=True)
class EmbeddingModel:
    module: torch.nn.Module
    model_id: str  # recorded on every embedding row
    weights_description: str  # for people: where the weights came from
    is_random: bool
    device: torch.device
    width: int


def resolve_device(name: str) -> torch.device:
    """A validated device setting (see EmbeddingSettings) as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_id_for(settings: EmbeddingSettings) -> str:
    """The id recorded on every embedding row, known without building the model.

    Stored vectors are reused only under the same id, so changing the weights
    (or the state-dict file's content) recomputes every vector.
    """
    seed = parse_random_seed(settings.weights)
    if seed is not None:
        weights_id = f"random-seed{seed}"
    elif Path(settings.weights).is_file():
        weights_id = f"state-dict-sha256-{_sha256_prefix(Path(settings.weights))}"
    else:
        weights_id = _weights_enum(settings.weights).name
    return f"torchvision/{_MODEL_NAME}/{weights_id}"


def load_model(settings: EmbeddingSettings) -> EmbeddingModel:
    """ResNet50 without its classifier, with the configured weights, ready for inference."""
    seed = parse_random_seed(settings.weights)
    if seed is not None:
        module, description = _random_resnet50(seed)
    elif Path(settings.weights).is_file():
        module, description = _resnet50_from_state_dict(Path(settings.weights))
    else:
        module, description = _pretrained_resnet50(settings.weights)
    width = module.fc.in_features
    module.fc = torch.nn.Identity()
    device = resolve_device(settings.device)
    module = module.eval().to(device)
    return EmbeddingModel(
        module=module,
        model_id=model_id_for(settings),
        weights_description=description,
        is_random=seed is not None,
        device=device,
        width=width,
    )


def pretrained_weights_cached(name: str = "DEFAULT") -> bool:
    """Whether torchvision's weights file is already in the local torch hub cache."""
    weights = _weights_enum(name)
    filename = weights.url.rsplit("/", 1)[-1]
    return (Path(torch.hub.get_dir()) / "checkpoints" / filename).is_file()


def preprocess(pixels: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, as `ToTensor` then ImageNet `Normalize`."""
    images = pixels.permute(0, 3, 1, 2).to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return images.sub(mean).div(std)


def embed_pixels(model: EmbeddingModel, pixels: np.ndarray) -> np.ndarray:
    """One batch of (N, 224, 224, 3) uint8 images -> (N, width) float32 embeddings."""
    with torch.inference_mode():
        batch = torch.from_numpy(pixels).to(model.device)
        return model.module(preprocess(batch)).float().cpu().numpy()


def embed_thumbnails(model: EmbeddingModel, jpegs: Sequence[bytes], batch_size: int) -> np.ndarray:
    """Embeddings of stored JPEG thumbnails, in input order, as (N, width) float32."""
    out = np.empty((len(jpegs), model.width), dtype=np.float32)
    with ThreadPoolExecutor() as pool:  # Pillow releases the GIL while decoding
        for start in range(0, len(jpegs), batch_size):
            chunk = jpegs[start : start + batch_size]
            pixels = np.stack(list(pool.map(decode_thumbnail, chunk)))
            out[start : start + len(chunk)] = embed_pixels(model, pixels)
    return out


@dataclass(frozen=True)
class EmbeddedPartition:
    table: pa.Table
    images_embedded: int  # went through the model
    images_reused: int  # kept their stored vector
    seconds: float  # decoding and inference of the embedded images
    model: EmbeddingModel | None  # None when every vector was reused and no model was loaded

    @property
    def images_per_second(self) -> float:
        return self.images_embedded / self.seconds if self.seconds > 0 else 0.0


def embed_partition(
    joined: pa.Table, previous: pa.Table | None, settings: EmbeddingSettings, schema: pa.Schema
) -> EmbeddedPartition:
    """The joined rows with their image replaced by its embedding and the model's id.

    A row whose image_id, content fingerprint (etag) and model_id match a row of
    `previous` (the partition as stored) keeps that vector; only new or changed
    images go through the model, which is loaded only if there are any.
    """
    model_id = model_id_for(settings)
    stored = _stored_vectors(previous, model_id)
    keys = list(zip(joined.column("image_id").to_pylist(), joined.column("etag").to_pylist()))
    to_embed = [row for row, key in enumerate(keys) if key not in stored.index]
    model, seconds, fresh = None, 0.0, np.empty((0, 0), np.float32)
    if to_embed:
        model = load_model(settings)
        started = time.perf_counter()
        jpegs = joined.column("image_jpeg").take(pa.array(to_embed)).to_pylist()
        fresh = embed_thumbnails(model, jpegs, settings.batch_size)
        seconds = time.perf_counter() - started
    width = model.width if model else stored.vectors.shape[1]
    vectors = np.empty((joined.num_rows, width), dtype=np.float32)
    if to_embed:
        vectors[to_embed] = fresh
    reused = [row for row, key in enumerate(keys) if key in stored.index]
    if reused:
        vectors[reused] = stored.vectors[[stored.index[keys[row]] for row in reused]]
    table = joined.append_column("embedding", embedding_array(vectors)).append_column(
        "model_id", pa.array([model_id] * joined.num_rows, pa.string())
    )
    return EmbeddedPartition(
        table=table.select(schema.names).cast(schema),
        images_embedded=len(to_embed),
        images_reused=len(reused),
        seconds=seconds,
        model=model,
    )


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


def _sha256_prefix(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _random_resnet50(seed: int) -> tuple[torch.nn.Module, str]:
    # Seed a forked RNG so building the model never disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = resnet50(weights=None)
    return module, f"RANDOM-initialised weights (seed {seed}): embeddings are not meaningful"


def _resnet50_from_state_dict(path: Path) -> tuple[torch.nn.Module, str]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ModelConfigError(f"{path} holds a {type(state).__name__}, not a ResNet50 state dict")
    module = resnet50(weights=None)
    # The classifier is dropped anyway, so a backbone-only state dict (saved
    # after fc = Identity) is accepted as well as a full one.
    backbone = {key: value for key, value in state.items() if not key.startswith("fc.")}
    missing, unexpected = module.load_state_dict(backbone, strict=False)
    missing_backbone = [key for key in missing if not key.startswith("fc.")]
    if missing_backbone or unexpected:
        raise ModelConfigError(
            f"{path} is not a ResNet50 state dict: missing {missing_backbone[:5]}, unexpected {unexpected[:5]}"
        )
    return module, f"state dict {path} (sha256 {_sha256_prefix(path)}...)"


def _pretrained_resnet50(name: str) -> tuple[torch.nn.Module, str]:
    weights = _weights_enum(name)
    try:
        module = resnet50(weights=weights)
    except Exception as exc:  # torchvision surfaces network and cache errors with many types
        raise ModelConfigError(
            f"could not load torchvision's pretrained ResNet50 weights {weights.name} "
            f"(they are downloaded once into {torch.hub.get_dir()}): {exc}. "
            "Put them in that cache, set the weights to a state-dict path, "
            "or set them to 'random' for explicitly random weights."
        ) from exc
    return module, f"pretrained torchvision weights {weights.name}"


def _weights_enum(name: str) -> ResNet50_Weights:
    try:
        return ResNet50_Weights[name] if name != "DEFAULT" else ResNet50_Weights.DEFAULT
    except KeyError as exc:
        choices = ["DEFAULT", *ResNet50_Weights.__members__, RANDOM_WEIGHTS, "<path to a state dict>"]
        raise ModelConfigError(f"unknown model weights {name!r}; choose one of {choices}") from exc
