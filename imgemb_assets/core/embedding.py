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


def load_model(settings: EmbeddingSettings) -> EmbeddingModel:
    """ResNet50 without its classifier, with the configured weights, ready for inference."""
    seed = parse_random_seed(settings.weights)
    if seed is not None:
        module, weights_id, description = _random_resnet50(seed)
    elif Path(settings.weights).is_file():
        module, weights_id, description = _resnet50_from_state_dict(Path(settings.weights))
    else:
        module, weights_id, description = _pretrained_resnet50(settings.weights)
    width = module.fc.in_features
    module.fc = torch.nn.Identity()
    device = resolve_device(settings.device)
    module = module.eval().to(device)
    return EmbeddingModel(
        module=module,
        model_id=f"torchvision/{_MODEL_NAME}/{weights_id}",
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
    seconds: float  # time spent decoding thumbnails and running the model

    @property
    def images_per_second(self) -> float:
        return self.table.num_rows / self.seconds if self.seconds > 0 else 0.0


def embed_partition(
    joined: pa.Table, model: EmbeddingModel, batch_size: int, schema: pa.Schema
) -> EmbeddedPartition:
    """The joined rows with their image replaced by its embedding and the model's id."""
    started = time.perf_counter()
    vectors = embed_thumbnails(model, joined.column("image_jpeg").to_pylist(), batch_size)
    seconds = time.perf_counter() - started
    table = joined.append_column("embedding", embedding_array(vectors)).append_column(
        "model_id", pa.array([model.model_id] * joined.num_rows, pa.string())
    )
    return EmbeddedPartition(table=table.select(schema.names).cast(schema), seconds=seconds)


def embedding_array(vectors: np.ndarray) -> pa.Array:
    """(N, width) float32 -> list<float32>; Delta has no fixed-size list type."""
    width = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel(), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, width).cast(EMBEDDING_TYPE)


def _random_resnet50(seed: int) -> tuple[torch.nn.Module, str, str]:
    # Seed a forked RNG so building the model never disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = resnet50(weights=None)
    return module, f"random-seed{seed}", f"RANDOM-initialised weights (seed {seed}): embeddings are not meaningful"


def _resnet50_from_state_dict(path: Path) -> tuple[torch.nn.Module, str, str]:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
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
    return module, f"state-dict-sha256-{digest}", f"state dict {path} (sha256 {digest}...)"


def _pretrained_resnet50(name: str) -> tuple[torch.nn.Module, str, str]:
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
    return module, weights.name, f"pretrained torchvision weights {weights.name}"


def _weights_enum(name: str) -> ResNet50_Weights:
    try:
        return ResNet50_Weights[name] if name != "DEFAULT" else ResNet50_Weights.DEFAULT
    except KeyError as exc:
        choices = ["DEFAULT", *ResNet50_Weights.__members__, RANDOM_WEIGHTS, "<path to a state dict>"]
        raise ModelConfigError(f"unknown model weights {name!r}; choose one of {choices}") from exc
