"""An open_clip checkpoint folder, read without torch: its architecture, the weights file, the vectors' width, the preprocessing.

The layout is open_clip's own (`create_model("local-dir:<folder>")`, what its
`push_to_hf_hub` writes and a Hugging Face snapshot of an open_clip model
holds): `open_clip_config.json` with the architecture under `model_cfg` (the
arguments of `open_clip.CLIP`) and optionally `preprocess_cfg`, beside one
weights file. The settings read it when the code location loads, to know the
width of the vectors, and to name config and weights together in the model_id
(model_settings.resolve_weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from imgemb_assets.core.embedding.backbones.specs import (
    OPENAI_CLIP_NORMALIZATION,
    ModelConfigError,
    Normalization,
    Preprocessing,
)

CONFIG_FILE: Final = "open_clip_config.json"
# open_clip's own preference among a folder's weights files (factory._find_checkpoint_in_dir); any other
# single *.safetensors, *.bin or *.pth is taken too. The file named here is the one hashed and the one loaded.
PREFERRED_WEIGHTS_FILES: Final = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
WEIGHTS_SUFFIXES: Final = (".safetensors", ".bin", ".pth")
# Text configs that need the transformers package and a tokenizer of their own: not supported (the text tower
# must tokenize offline, with the vocabulary open_clip ships).
_UNSUPPORTED_TEXT_KEYS: Final = ("hf_model_name", "hf_tokenizer_name")


@dataclass(frozen=True)
class CheckpointDir:
    folder: Path
    weights_file: Path
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]

    @property
    def width(self) -> int:
        """The width of the image (and text) vectors: the CLIP's `embed_dim`."""
        return int(self.model_cfg["embed_dim"])

    @property
    def preprocessing(self) -> Preprocessing:
        """open_clip's eval transform for this config, as the thumbnails get it (see specs.Preprocessing).

        A stored thumbnail is square, so open_clip's resize modes (shortest side and
        crop, longest side and pad, squash) all come to one resize to the input size.
        """
        mean = self.preprocess_cfg.get("mean", OPENAI_CLIP_NORMALIZATION.mean)
        std = self.preprocess_cfg.get("std", OPENAI_CLIP_NORMALIZATION.std)
        bilinear = self.preprocess_cfg.get("interpolation") == "bilinear"
        return Preprocessing(
            Normalization(_three(mean), _three(std)), self.input_size, "bilinear" if bilinear else "bicubic"
        )

    @property
    def input_size(self) -> int:
        size = self.model_cfg.get("vision_cfg", {}).get("image_size", 224)
        sides = size if isinstance(size, list | tuple) else (size, size)
        if len(sides) != 2 or sides[0] != sides[1]:
            raise ModelConfigError(f"{self.folder / CONFIG_FILE}: image_size {size} is not square")
        return int(sides[0])


def read_checkpoint_dir(folder: Path) -> CheckpointDir:
    """The folder's config and weights file; ModelConfigError in one line saying what is missing or wrong."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ModelConfigError(f"{folder} is not an open_clip checkpoint folder: it has no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"{config_path} is not readable JSON: {exc}") from exc
    model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("embed_dim"), int):
        raise ModelConfigError(f"{config_path} has no model_cfg with an integer embed_dim")
    text_cfg = model_cfg.get("text_cfg", {})
    unsupported = [key for key in _UNSUPPORTED_TEXT_KEYS if isinstance(text_cfg, dict) and text_cfg.get(key)]
    if unsupported:
        raise ModelConfigError(
            f"{config_path}: a Hugging Face text tower ({', '.join(unsupported)}) is not supported; "
            "the text tower must use open_clip's own tokenizer"
        )
    preprocess_cfg = config.get("preprocess_cfg") or {}
    return CheckpointDir(folder, _weights_file(folder), model_cfg, preprocess_cfg)


def _weights_file(folder: Path) -> Path:
    for name in PREFERRED_WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(path for path in folder.iterdir() if path.suffix in WEIGHTS_SUFFIXES and path.is_file())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModelConfigError(f"{folder} holds {CONFIG_FILE} but no weights file ({', '.join(WEIGHTS_SUFFIXES)})")
    raise ModelConfigError(
        f"{folder} holds several weights files {[path.name for path in candidates]} and none of open_clip's "
        f"usual names ({PREFERRED_WEIGHTS_FILES[0]}, ...): keep one"
    )


def _three(values: Any) -> tuple[float, float, float]:
    numbers = [float(v) for v in values] if isinstance(values, list | tuple) else [float(values)] * 3
    if len(numbers) != 3:
        raise ModelConfigError(f"preprocess_cfg mean and std need 3 channels, got {values}")
    return numbers[0], numbers[1], numbers[2]
