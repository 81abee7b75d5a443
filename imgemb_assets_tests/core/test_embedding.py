"""Embeddings equal the article's per-image torchvision computation; weights are loaded and labelled as configured."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.models import ResNet50_Weights, resnet50

from imgemb_assets.core.embedding.backbones.specs import IMAGENET_NORMALIZATION
from imgemb_assets.core.embedding.backbones.torchvision_weights import pretrained_weights_cached
from imgemb_assets.core.embedding.inference import embed_thumbnails
from imgemb_assets.core.embedding.model_settings import EmbeddingSettings, ModelConfigError
from imgemb_assets.core.embedding.models import EmbeddingModel, load_model
from imgemb_assets.core.imaging.images import downscale


@pytest.fixture(scope="module")
def random_model() -> EmbeddingModel:
    return load_model(EmbeddingSettings(weights="random:7", device="cpu"))


@pytest.fixture(scope="module")
def thumbnails() -> list[bytes]:
    rng = np.random.default_rng(3)
    out = []
    for size in [(300, 200), (224, 224), (90, 500), (640, 480), (50, 50)]:
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG")
        out.append(downscale(buffer.getvalue()).jpeg)
    return out


def _article_embeddings(module: torch.nn.Module, jpegs: list[bytes]) -> np.ndarray:
    """The article's computation: per image, ToTensor + Normalize, then the headless model."""
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(IMAGENET_NORMALIZATION.mean, IMAGENET_NORMALIZATION.std)]
    )
    with torch.no_grad():
        return np.stack(
            [module(transform(Image.open(io.BytesIO(j)).convert("RGB")).unsqueeze(0))[0].numpy() for j in jpegs]
        )


def _assert_close_relative(actual: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    scale = float(np.abs(expected).max())
    assert scale > 0
    worst = float(np.abs(actual - expected).max())
    assert worst <= tolerance * scale, f"max abs difference {worst} exceeds {tolerance} x {scale}"


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_embeddings_equal_the_article_transform_and_model(
    random_model: EmbeddingModel, thumbnails: list[bytes], batch_size: int
) -> None:
    ours = embed_thumbnails(replace(random_model, batch_size=batch_size), thumbnails)
    assert ours.shape == (len(thumbnails), 2048)
    assert ours.dtype == np.float32
    _assert_close_relative(ours, _article_embeddings(random_model.module, thumbnails), 1e-5)


def test_classifier_is_removed_and_model_is_in_eval_mode(random_model: EmbeddingModel) -> None:
    assert isinstance(random_model.module.fc, torch.nn.Identity)
    assert not random_model.module.training
    assert random_model.width == 2048


def test_random_weights_are_seeded_and_labelled(random_model: EmbeddingModel) -> None:
    assert random_model.is_random
    assert random_model.model_id == "torchvision/resnet50/random-seed7/fp32"
    assert "RANDOM" in random_model.weights_description
    again = load_model(EmbeddingSettings(weights="random:7", device="cpu"))
    other = load_model(EmbeddingSettings(weights="random:8", device="cpu"))
    first = random_model.module.conv1.weight
    assert torch.equal(first, again.module.conv1.weight)
    assert not torch.equal(first, other.module.conv1.weight)


def test_loading_a_model_does_not_disturb_the_callers_random_state() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model(EmbeddingSettings(weights="random", device="cpu"))
    assert torch.equal(torch.rand(3), expected)


def test_state_dict_file_weights(tmp_path: Path, random_model: EmbeddingModel, thumbnails: list[bytes]) -> None:
    full = resnet50(weights=None)
    full.load_state_dict(random_model.module.state_dict(), strict=False)  # keeps its own fc
    path = tmp_path / "resnet50.pt"
    torch.save(full.state_dict(), path)
    loaded = load_model(EmbeddingSettings(weights=str(path), device="cpu"))
    assert loaded.model_id.startswith("torchvision/resnet50/state-dict-sha256-")
    assert loaded.model_id.endswith("/fp32")
    assert not loaded.is_random
    np.testing.assert_array_equal(embed_thumbnails(loaded, thumbnails), embed_thumbnails(random_model, thumbnails))


def test_backbone_only_state_dict_is_accepted(tmp_path: Path, random_model: EmbeddingModel) -> None:
    path = tmp_path / "backbone.pt"
    torch.save(random_model.module.state_dict(), path)  # saved after fc = Identity: no fc keys
    assert load_model(EmbeddingSettings(weights=str(path), device="cpu")).width == 2048


def test_a_state_dict_of_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ModelConfigError, match="not a state dict of this backbone"):
        load_model(EmbeddingSettings(weights=str(path), device="cpu"))


def test_pretrained_weights_load_through_torchvisions_own_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, random_model: EmbeddingModel
) -> None:
    # The real download cannot happen here, so the cache torchvision reads is
    # filled by hand with a state dict of the right shape; the loading code is torchvision's.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert not pretrained_weights_cached("DEFAULT")
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    full = resnet50(weights=None)
    full.load_state_dict(random_model.module.state_dict(), strict=False)
    torch.save(full.state_dict(), checkpoints / ResNet50_Weights.DEFAULT.url.rsplit("/", 1)[-1])
    assert pretrained_weights_cached("DEFAULT")
    loaded = load_model(EmbeddingSettings(weights="DEFAULT", device="cpu"))
    assert loaded.model_id == f"torchvision/resnet50/{ResNet50_Weights.DEFAULT.name}/fp32"
    assert not loaded.is_random
    assert torch.equal(loaded.module.conv1.weight, random_model.module.conv1.weight)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(weights="IMAGENET9K"), "unknown resnet50 weights 'IMAGENET9K'"),
        (dict(weights="random", model="alexnet"), "unknown model 'alexnet'"),
        (dict(weights="random", precision="fp8"), "unknown precision 'fp8'"),
        (dict(weights="random", runtime="openvino"), "unknown runtime 'openvino'"),
        (dict(weights="random", device="cpu", precision="fp16"), "fp16 needs a CUDA device"),
        (dict(weights=" "), "weights setting is empty"),
        (dict(weights="random:abc"), "seed must be a non-negative integer"),
        (dict(weights="random", batch_size=0), "batch size must be at least 1"),
        (dict(weights="random", device="tpu"), "unsupported device 'tpu'"),
        (dict(weights="random", device="cuda:x"), "unsupported device 'cuda:x'"),
    ],
)
def test_invalid_settings_are_clear_errors(settings: dict, message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        load_model(EmbeddingSettings(**settings))


@pytest.mark.parametrize(("model", "width"), [("resnet18", 512), ("vit_b_16", 768)])
def test_other_backbones_take_their_width_from_the_model(model: str, width: int, thumbnails: list[bytes]) -> None:
    loaded = load_model(EmbeddingSettings(weights="random", device="cpu", model=model, batch_size=2))
    assert loaded.width == width
    assert loaded.model_id == f"torchvision/{model}/random-seed0/fp32"
    ours = embed_thumbnails(loaded, thumbnails[:3])
    assert ours.shape == (3, width)
    _assert_close_relative(ours, _article_embeddings(loaded.module, thumbnails[:3]), 1e-5)
