"""open_clip's CLIPs (clip_vit_b_32, open_clip_dir): the image tower with its preprocessing, and the text tower beside it.

One checkpoint holds both towers, so one weights setting names both:
- `random` / `random:<seed>`: the architecture initialised under the seed, labelled RANDOM;
- a pretrained tag (`DEFAULT` is the table's `default_weights`): open_clip downloads it
  once into its own cache, Hugging Face's hub cache (HF_HUB_CACHE) for the tags hosted
  there and ~/.cache/clip for the others; where no network is, it must be there already;
- a checkpoint file: whatever open_clip's `load_checkpoint` reads (a state dict, one
  under `state_dict`, .safetensors), loaded strictly: both towers must be in it;
- a checkpoint folder (model open_clip_dir): its own architecture (checkpoint_dir.py).

Image vectors are `encode_image(normalize=False)`: the image tower's projection into
the space it shares with text, unnormalised as ResNet's pooled features are (search
compares by cosine). Text vectors (`text_encoder.TextEncoder.encode`) are L2-normalised.

What the image tower sees is the stored thumbnail, the pipeline's one input for every
model: the whole photo resized to 224x224 (bilinear, as the article's and Daft's
`resize(224, 224)`). open_clip's eval transform for a 224 px CLIP (bicubic resize of the
shortest side to 224, centre crop to 224) leaves such a thumbnail unchanged, so a
thumbnail's vector is exactly open_clip's for it; open_clip given the original photo
would crop a non-square one where the thumbnail squashes it. A CLIP of another input
size gets the thumbnail resized on the device (inference.preprocess).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import open_clip
import torch
from huggingface_hub import constants as hf_constants

from imgemb_assets.core.embedding.backbones.checkpoint_dir import CONFIG_FILE, PREFERRED_WEIGHTS_FILES
from imgemb_assets.core.embedding.backbones.family import BuiltBackbone, BuiltTextTower
from imgemb_assets.core.embedding.backbones.specs import BackboneSpec, Normalization, Preprocessing
from imgemb_assets.core.embedding.model_settings import RANDOM_WEIGHTS, ModelConfigError, ResolvedWeights

# What save_checkpoint_dir names the weights file: open_clip's own name for a torch-saved state dict.
CHECKPOINT_WEIGHTS_FILE: Final = PREFERRED_WEIGHTS_FILES[2]  # open_clip_pytorch_model.bin


def weights_id(spec: BackboneSpec, weights: ResolvedWeights) -> str:
    """The weights' part of the model_id: the pretrained tag (DEFAULT resolved, open_clip's spelling), else the identity."""
    if weights.kind != "pretrained":
        return weights.identity
    tag = spec.pretrained_weights_id(weights.identity)
    if tag is None:
        raise ModelConfigError(f"{spec.name} has no pretrained weights; use a checkpoint folder")
    return tag


def create_model_and_preprocessing(spec: BackboneSpec, weights: ResolvedWeights) -> BuiltBackbone:
    """The image tower (`visual`, whose output is `encode_image`'s) and open_clip's preprocessing for it."""
    clip, description = _build_clip(spec, weights)
    return BuiltBackbone(clip.visual, _preprocessing_of(clip), description, _width_of(clip))


def create_text_tower(spec: BackboneSpec, weights: ResolvedWeights) -> BuiltTextTower:
    """The text tower of the same checkpoint and its tokenizer (open_clip's, offline: its BPE vocabulary ships with it)."""
    clip, description = _build_clip(spec, weights)
    width = _width_of(clip)
    clip.visual = torch.nn.Identity()  # the text tower alone: the image tower's memory is given back
    tokenizer = open_clip.get_tokenizer(_open_clip_name(spec, weights))
    context_length = int(tokenizer.context_length)

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, context_length=context_length)

    return BuiltTextTower(_TextTower(clip), tokenize, context_length, description, width)


def save_checkpoint_dir(
    clip: torch.nn.Module, model_cfg: Mapping[str, Any], folder: Path, preprocess_cfg: Mapping[str, Any] | None = None
) -> Path:
    """Writes a CLIP in open_clip's local-dir layout, the weights form of model open_clip_dir; returns the folder.

    `model_cfg` is what built it (`open_clip.CLIP(**model_cfg)`); `preprocess_cfg`
    overrides open_clip's defaults (OpenAI's normalization, bicubic). For a model
    trained here, as a test trains a tiny CLIP.
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": dict(model_cfg), "preprocess_cfg": dict(preprocess_cfg or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    torch.save(clip.state_dict(), folder / CHECKPOINT_WEIGHTS_FILE)
    return folder


class _TextTower(torch.nn.Module):
    """A CLIP whose forward is `encode_text`: token ids to unnormalised text vectors."""

    def __init__(self, clip: Any) -> None:  # open_clip's CLIP or CustomTextCLIP
        super().__init__()
        self.clip = clip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        vectors: torch.Tensor = self.clip.encode_text(tokens)
        return vectors


def _open_clip_name(spec: BackboneSpec, weights: ResolvedWeights) -> str:
    """open_clip's name for the architecture: the table's, or `local-dir:<folder>` for a checkpoint folder."""
    if weights.checkpoint is not None:
        return f"local-dir:{weights.checkpoint.folder}"
    if spec.architecture is None:
        raise ModelConfigError(f"{spec.name} takes its architecture from a checkpoint folder")
    return spec.architecture


def _build_clip(spec: BackboneSpec, weights: ResolvedWeights) -> tuple[Any, str]:
    """The whole CLIP (both towers) with these weights, in eval mode, and where its weights came from."""
    name = _open_clip_name(spec, weights)
    # Building initialises weights from torch's RNG: a forked one, so the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weights.seed or 0)
        if weights.seed is not None:
            with _quiet_random_init():
                clip = open_clip.create_model(name, load_weights=False)
            description = f"RANDOM-initialised weights (seed {weights.seed}): embeddings are not meaningful"
        elif weights.kind == "pretrained":
            clip = _pretrained(spec, name, weights_id(spec, weights))
            description = f"pretrained open_clip weights {name}/{weights_id(spec, weights)}"
        else:
            with _quiet_random_init():
                clip = open_clip.create_model(name, load_weights=False)
            path = weights.checkpoint.weights_file if weights.checkpoint is not None else weights.path
            _load_checkpoint(clip, path, spec)
            description = f"open_clip checkpoint {weights.path} ({weights.identity})"
    return clip.eval(), description


class _RandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Without open_clip's root-logger warning that a model built without pretrained weights is random.

    It comes also when a checkpoint is loaded right after, and in a command's output it
    is a stray `WARNING:root:` line; the project labels the weights itself (the weights
    description, the model_id, `imgemb similar`'s warning for random ones).
    """
    quiet = _RandomInitWarning()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _load_checkpoint(clip: torch.nn.Module, path: Path | None, spec: BackboneSpec) -> None:
    try:
        open_clip.load_checkpoint(clip, str(path), strict=True)
    except Exception as exc:  # torch.load, safetensors and load_state_dict fail with many types
        raise ModelConfigError(f"{path} is not a checkpoint of this {spec.name} model: {exc}"[:600]) from exc


def _pretrained(spec: BackboneSpec, name: str, tag: str) -> Any:
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        choices = ["DEFAULT", *tags, RANDOM_WEIGHTS, "<path to a checkpoint file>"]
        raise ModelConfigError(f"unknown {spec.name} weights {tag!r}; choose one of {choices}")
    # OpenAI's weights (and LAION-400M's) were trained with QuickGELU, which ViT-B-32's config does not say.
    quick_gelu = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
    try:
        return open_clip.create_model(name, pretrained=tag, force_quick_gelu=quick_gelu, require_pretrained=True)
    except Exception as exc:  # huggingface_hub, urllib and torch.load fail with many types
        raise ModelConfigError(
            f"could not load open_clip's pretrained {name} weights {tag} (downloaded once into Hugging Face's "
            f"cache {hf_constants.HF_HUB_CACHE}, or ~/.cache/clip for tags not on the Hub): {exc}. "
            "Put them in that cache, set the weights to a checkpoint file, "
            "or set them to 'random' for explicitly random weights."
        ) from exc


def _width_of(clip: Any) -> int:
    width = getattr(clip.visual, "output_dim", None)
    if not isinstance(width, int):
        raise ModelConfigError(f"cannot tell the embedding width of a {type(clip.visual).__name__} image tower")
    return width


def _preprocessing_of(clip: Any) -> Preprocessing:
    """open_clip's eval preprocessing of this model (its `preprocess_cfg`), as the stored thumbnails get it."""
    cfg = open_clip.get_model_preprocess_cfg(clip)
    size = cfg["size"]
    side, other = (size, size) if isinstance(size, int) else size
    if side != other:
        raise ModelConfigError(f"open_clip input size {size} is not square")
    mean, std = (tuple(float(v) for v in cfg[key]) for key in ("mean", "std"))
    normalization = Normalization((mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))
    return Preprocessing(normalization, int(side), "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic")
