"""The CLIP backbones on real open_clip, offline: random and checkpoint weights labelled and named, image vectors as open_clip's own transform gives them, the paired text tower, refusals.

No weights are downloaded: clip_vit_b_32 is built with random weights, and a tiny
open_clip CLIP (32 px images, 2 layers per tower) is saved in open_clip's
checkpoint-folder layout and loaded as model open_clip_dir wherever the
architecture does not matter. The pretrained path runs up to open_clip's download,
which Hugging Face's offline mode refuses at once. ResNet50's vectors are
test_embedding.py's.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from imgemb_assets.core.embedding.backbones import clip as clip_family
from imgemb_assets.core.embedding.backbones.checkpoint_dir import CONFIG_FILE, read_checkpoint_dir
from imgemb_assets.core.embedding.backbones.clip import CHECKPOINT_WEIGHTS_FILE, save_checkpoint_dir
from imgemb_assets.core.embedding.backbones.specs import (
    BACKBONE_SPECS,
    NoTextTower,
    has_text_tower,
    require_text_tower,
)
from imgemb_assets.core.embedding.inference import embed_thumbnails
from imgemb_assets.core.embedding.model_settings import (
    EmbeddingSettings,
    ModelConfigError,
    checkpoint_identity,
    model_code_version,
    model_id_has_random_weights,
)
from imgemb_assets.core.embedding.models import EmbeddingModel, load_model, model_id_for
from imgemb_assets.core.embedding.text_encoder import load_text_encoder
from imgemb_assets.core.embedding_bench import generated_thumbnails

TINY_CLIP: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def thumbnails() -> list[bytes]:
    return generated_thumbnails(4, distinct=4)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(5)
    return save_checkpoint_dir(open_clip.CLIP(**TINY_CLIP), TINY_CLIP, tmp_path_factory.mktemp("tiny") / "clip")


@pytest.fixture(scope="module")
def vit_b_32() -> EmbeddingModel:
    return load_model(EmbeddingSettings(weights="random", model="clip_vit_b_32", device="cpu", batch_size=4))


def _tiny(folder: Path) -> EmbeddingSettings:
    return EmbeddingSettings(weights=str(folder), model="open_clip_dir", device="cpu")


def _open_clip_vectors(image_tower: torch.nn.Module, transform: Any, jpegs: list[bytes]) -> np.ndarray:
    """open_clip's own computation: its eval transform on each decoded thumbnail (PIL), then `encode_image`."""
    with torch.inference_mode():
        pixels = torch.stack([transform(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])
        return image_tower(pixels).numpy()


def _max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_clip_vit_b_32_with_random_weights_is_labelled_and_writes_open_clips_512_d_vectors(
    vit_b_32: EmbeddingModel, thumbnails: list[bytes]
) -> None:
    assert vit_b_32.model_id == "open_clip/clip_vit_b_32/random-seed0/fp32"
    assert model_id_has_random_weights(vit_b_32.model_id)
    assert vit_b_32.is_random and "RANDOM" in vit_b_32.weights_description
    assert vit_b_32.has_text_tower and vit_b_32.width == 512
    assert vit_b_32.preprocessing == BACKBONE_SPECS["clip_vit_b_32"].preprocessing
    ours = embed_thumbnails(vit_b_32, thumbnails)
    assert ours.shape == (len(thumbnails), 512) and ours.dtype == np.float32
    # At 224 px open_clip's resize and centre crop leave a stored thumbnail as it is: the same vectors.
    transform = open_clip.image_transform(224, is_train=False)
    assert _max_relative_error(ours, _open_clip_vectors(vit_b_32.module, transform, thumbnails)) <= 1e-5


def test_clip_vit_b_32_text_tower_encodes_offline_into_the_image_vectors_space(vit_b_32: EmbeddingModel) -> None:
    encoder = load_text_encoder(EmbeddingSettings(weights="random", model="clip_vit_b_32", device="cpu"))
    assert encoder.model_id == vit_b_32.model_id  # the pairing rule: equal ids
    assert encoder.is_random and "RANDOM" in encoder.weights_description
    assert encoder.context_length == 77
    vectors = encoder.encode(["red running shoes", "a photo of a cat"])
    assert vectors.shape == (2, 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)


def test_a_checkpoint_folder_brings_its_architecture_and_preprocessing(tiny_dir: Path, thumbnails: list[bytes]) -> None:
    settings = _tiny(tiny_dir)
    assert settings.width == 32  # from open_clip_config.json, without building anything
    model = load_model(settings)
    assert not model.is_random and model.has_text_tower
    identity = checkpoint_identity(read_checkpoint_dir(tiny_dir))
    assert identity.startswith("checkpoint-sha256-")
    assert model.model_id == f"open_clip/open_clip_dir/{identity}/fp32"
    assert model.preprocessing == read_checkpoint_dir(tiny_dir).preprocessing  # torch-free reading == open_clip's
    assert model.preprocessing.input_size == 32 and model.preprocessing.interpolation == "bicubic"
    ours = embed_thumbnails(model, thumbnails)
    assert ours.shape == (len(thumbnails), 32)
    # 224 -> 32 px: resized on the tensor (antialiased bicubic), within rounding of open_clip's PIL resize.
    reference = _open_clip_vectors(model.module, open_clip.image_transform(32, is_train=False), thumbnails)
    assert _max_relative_error(ours, reference) < 2e-3
    cosine = np.sum(ours * reference, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() > 0.9999


def test_the_text_tower_is_the_checkpoints_and_normalised(tiny_dir: Path) -> None:
    encoder = load_text_encoder(_tiny(tiny_dir))
    assert encoder.model_id == model_id_for(_tiny(tiny_dir))
    assert encoder.context_length == 16 and encoder.width == 32
    texts = ["a red circle", "a blue square", "a very long caption " * 20]  # the last is cut to 16 tokens
    vectors = encoder.encode(texts)
    original = open_clip.CLIP(**TINY_CLIP)
    original.load_state_dict(torch.load(tiny_dir / CHECKPOINT_WEIGHTS_FILE, weights_only=True))
    with torch.inference_mode():
        tokens = open_clip.SimpleTokenizer(context_length=16)(texts)
        expected = original.eval().encode_text(tokens, normalize=True).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    assert encoder.encode([]).shape == (0, 32)
    with pytest.raises(TypeError, match="not one string"):
        encoder.encode("a red circle")


def _rewrite_first_weight(folder: Path) -> None:
    state = torch.load(folder / CHECKPOINT_WEIGHTS_FILE, weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1
    torch.save(state, folder / CHECKPOINT_WEIGHTS_FILE)


def test_model_id_and_code_version_name_the_checkpoint_of_both_towers(tiny_dir: Path, tmp_path: Path) -> None:
    same = Path(shutil.copytree(tiny_dir, tmp_path / "same"))
    weights_changed = Path(shutil.copytree(tiny_dir, tmp_path / "weights"))
    _rewrite_first_weight(weights_changed)
    config_changed = Path(shutil.copytree(tiny_dir, tmp_path / "config"))
    config = json.loads((config_changed / CONFIG_FILE).read_text())
    config["preprocess_cfg"] = {"interpolation": "bilinear"}
    (config_changed / CONFIG_FILE).write_text(json.dumps(config))
    ids = {name: model_id_for(_tiny(folder)) for name, folder in
           [("tiny", tiny_dir), ("same", same), ("weights", weights_changed), ("config", config_changed)]}  # fmt: skip
    assert ids["same"] == ids["tiny"]  # content, not place
    assert len({ids["tiny"], ids["weights"], ids["config"]}) == 3
    versions = {
        model_code_version("open_clip_dir", str(folder)) for folder in (tiny_dir, weights_changed, config_changed)
    }
    assert len(versions) == 3
    assert model_code_version("open_clip_dir", str(tiny_dir)) == f"open_clip_dir/{ids['tiny'].split('/')[2]}"
    # The text tower's weights are in the same file: changing only them changes the id too.
    text_only = Path(shutil.copytree(tiny_dir, tmp_path / "text"))
    state = torch.load(text_only / CHECKPOINT_WEIGHTS_FILE, weights_only=True)
    state["token_embedding.weight"] = state["token_embedding.weight"] * 2
    torch.save(state, text_only / CHECKPOINT_WEIGHTS_FILE)
    assert model_id_for(_tiny(text_only)) not in ids.values()


def test_pretrained_tags_are_named_and_go_through_open_clips_download(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    default = EmbeddingSettings(weights="DEFAULT", model="clip_vit_b_32", device="cpu")
    assert model_id_for(default) == "open_clip/clip_vit_b_32/laion2b_s34b_b79k/fp32"
    assert model_code_version("clip_vit_b_32", "DEFAULT") == "clip_vit_b_32/laion2b_s34b_b79k"
    assert model_code_version("clip_vit_b_32", "OpenAI") == "clip_vit_b_32/openai"
    # Offline, with an empty cache: open_clip's own download is tried and refused at once.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        ModelConfigError, match=r"could not load open_clip's pretrained ViT-B-32 weights laion2b_s34b_b79k"
    ):
        load_model(default)
    with pytest.raises(ModelConfigError, match="unknown clip_vit_b_32 weights 'laion9b'"):
        load_model(EmbeddingSettings(weights="laion9b", model="clip_vit_b_32", device="cpu"))


def test_openai_weights_are_built_with_quick_gelu(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[dict[str, Any]] = []

    def create_model(name: str, **kwargs: Any) -> None:
        asked.append({"name": name, **kwargs})
        raise RuntimeError("no network here")

    monkeypatch.setattr(clip_family.open_clip, "create_model", create_model)
    for weights in ("openai", "DEFAULT"):
        with pytest.raises(ModelConfigError, match="no network here"):
            load_model(EmbeddingSettings(weights=weights, model="clip_vit_b_32", device="cpu"))
    assert [(a["pretrained"], a["force_quick_gelu"]) for a in asked] == [("openai", True), ("laion2b_s34b_b79k", False)]


def test_a_model_without_a_text_tower_is_refused_in_one_line() -> None:
    assert not has_text_tower("resnet50") and has_text_tower("clip_vit_b_32") and has_text_tower("open_clip_dir")
    assert not has_text_tower("alexnet")
    with pytest.raises(NoTextTower) as refused:
        load_text_encoder(EmbeddingSettings(weights="random", model="resnet18", device="cpu"))
    assert str(refused.value) == "resnet18 has no text tower: text needs a CLIP model (clip_vit_b_32, open_clip_dir)"
    with pytest.raises(NoTextTower, match="^vit_b_16 has no text tower"):
        require_text_tower("vit_b_16")
    assert isinstance(refused.value, ModelConfigError)


@pytest.mark.parametrize(
    ("model", "weights", "message"),
    [
        ("open_clip_dir", "random", "takes its architecture from an open_clip checkpoint folder"),
        ("clip_vit_b_32", "{folder}", "use model open_clip_dir"),
        ("resnet50", "{folder}", "use model open_clip_dir"),
    ],
)
def test_weights_of_the_wrong_form_are_refused(tiny_dir: Path, model: str, weights: str, message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        EmbeddingSettings(weights=weights.format(folder=tiny_dir), model=model)


def test_a_folder_that_is_not_an_open_clip_checkpoint_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="has no open_clip_config.json"):
        _tiny(tmp_path).width  # noqa: B018
    two = Path(shutil.copytree(tiny_dir, tmp_path / "two"))
    (two / CHECKPOINT_WEIGHTS_FILE).rename(two / "a.bin")
    shutil.copy(two / "a.bin", two / "b.bin")
    with pytest.raises(ModelConfigError, match="several weights files"):
        model_id_for(_tiny(two))
    other = Path(shutil.copytree(tiny_dir, tmp_path / "other"))
    torch.save({"weight": torch.zeros(2)}, other / CHECKPOINT_WEIGHTS_FILE)
    with pytest.raises(ModelConfigError, match="is not a checkpoint of this open_clip_dir model"):
        load_model(_tiny(other))


def test_building_a_clip_leaves_the_callers_random_state_alone(tiny_dir: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_text_encoder(_tiny(tiny_dir))
    assert torch.equal(torch.rand(3), expected)
