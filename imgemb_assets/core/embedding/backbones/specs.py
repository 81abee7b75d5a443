"""What each backbone name is, known without importing torch: family, architecture, weights, width, head, preprocessing.

The one table of backbone facts. The Dagster resources validate a model name
against it and the settings take a model's vector width from it when the code
location loads, so it imports nothing heavier than the thumbnail size; the
family modules beside it build what a name describes (models.load_model picks
the family). Tests check every fact here against the library that provides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

from imgemb_assets.core.imaging.images import IMAGE_SIZE

# Each choice declared once, as the type the Dagster resource's config uses; the tuple and the table derive from it.
BackboneName = Literal["resnet50", "resnet18", "vit_b_16", "clip_vit_b_32", "open_clip_dir"]
BACKBONES: Final = get_args(BackboneName)
# The module under core/embedding/backbones/ that builds a family's models.
FamilyName = Literal["resnet", "vit", "clip"]
# The first part of a model_id: whose architecture and weights names the rest of the id uses.
LibraryName = Literal["torchvision", "open_clip"]


class ModelConfigError(ValueError):
    """The model settings are invalid or the weights cannot be loaded.

    Defined at the bottom of the model side so that every module above it raises the same error.
    """


class NoTextTower(ModelConfigError):
    """A text query or text prompts asked of a model that has no text tower (see `has_text_tower`)."""


@dataclass(frozen=True)
class Normalization:
    """What the backbone was trained on: per-channel mean and std of [0, 1] pixels (the article's `Normalize`)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# torchvision's weights for its backbones were all trained on ImageNet, normalized so.
IMAGENET_NORMALIZATION: Final = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# OpenAI's CLIP training set, which open_clip keeps for its own CLIP weights (open_clip.constants).
OPENAI_CLIP_NORMALIZATION: Final = Normalization(
    mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)
)


@dataclass(frozen=True)
class Preprocessing:
    """How a batch of stored thumbnails becomes the model's input (timm's data config, open_clip's PreprocessCfg).

    Thumbnails are stored at IMAGE_SIZE x IMAGE_SIZE. A model that takes that size
    gets them as they are, through `ToTensor` and `Normalize` (the article's
    transform); one that takes another size gets them resized first, with
    `interpolation` (see inference.preprocess).
    """

    normalization: Normalization
    input_size: int = IMAGE_SIZE
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"


IMAGENET_AT_THUMBNAIL_SIZE: Final = Preprocessing(IMAGENET_NORMALIZATION)
# open_clip's eval transform for its 224 px CLIPs: bicubic resize of the shortest side and centre crop to 224
# (both identities on a stored 224x224 thumbnail), then OpenAI's normalization.
OPENAI_CLIP_AT_THUMBNAIL_SIZE: Final = Preprocessing(OPENAI_CLIP_NORMALIZATION, IMAGE_SIZE, "bicubic")


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone name: which family builds it, from what, and the vectors it writes.

    architecture: the library's own name for it (torchvision's builder, open_clip's model
    config); None where the weights bring their own (open_clip_dir: the checkpoint folder's config).
    weights: where the library keeps the names of its pretrained weights: torchvision's
    WeightsEnum class; None for open_clip, whose tags are its `list_pretrained_tags_by_model`.
    default_weights: what `DEFAULT` names among them; None where nothing is pretrained.
    head: the attribute holding the classifier, replaced by Identity; None for an image tower
    that has none (a CLIP's vectors are its projection into the space it shares with text).
    width: the vector width without the classifier; None: read from the checkpoint folder.
    preprocessing: what its input needs; None: read from the checkpoint folder.
    text_tower: whether the same weights embed text into the space of the image vectors.
    """

    name: str
    family: FamilyName
    library: LibraryName
    architecture: str | None
    weights: str | None
    default_weights: str | None
    head: str | None
    width: int | None
    preprocessing: Preprocessing | None = IMAGENET_AT_THUMBNAIL_SIZE
    text_tower: bool = False

    def pretrained_weights_id(self, name: str) -> str | None:
        """How a model_id names pretrained weights `name`, where this table can tell without the library.

        open_clip's tags are fixed strings (spelled as open_clip cleans them) and its DEFAULT
        is this table's choice, so the code version names the tag a setting means. torchvision's
        DEFAULT is torchvision's to resolve: None, and the code version keeps the name as written.
        """
        if self.library != "open_clip":
            return None
        if name == "DEFAULT":
            return self.default_weights
        return name.lower().replace("-", "_")


def _open_clip_spec(
    name: str,
    architecture: str | None,
    default_weights: str | None,
    width: int | None,
    preprocessing: Preprocessing | None,
) -> BackboneSpec:
    """An open_clip CLIP: its tags name the weights, its image tower has no classifier, and it embeds text."""
    return BackboneSpec(
        name, "clip", "open_clip", architecture, None, default_weights, None, width, preprocessing, text_tower=True
    )


BACKBONE_SPECS: Final[dict[str, BackboneSpec]] = {
    "resnet50": BackboneSpec(
        "resnet50", "resnet", "torchvision", "resnet50", "ResNet50_Weights", "IMAGENET1K_V2", head="fc", width=2048
    ),
    "resnet18": BackboneSpec(
        "resnet18", "resnet", "torchvision", "resnet18", "ResNet18_Weights", "IMAGENET1K_V1", head="fc", width=512
    ),
    "vit_b_16": BackboneSpec(
        "vit_b_16", "vit", "torchvision", "vit_b_16", "ViT_B_16_Weights", "IMAGENET1K_V1", head="heads", width=768
    ),
    # open_clip's ViT-B-32: the article-scale CLIP the vector-side peers default to (LanceDB's open_clip
    # embedding, clip-retrieval), 512-d vectors, cheap on a CPU (a 224 px image is 49 patches of 32 px, where
    # ViT-B-16 has 196). DEFAULT is the pairing open_clip's own README starts from, laion2b_s34b_b79k;
    # `openai` (QuickGELU, set by the family) and open_clip's other ViT-B-32 tags are accepted by name.
    "clip_vit_b_32": _open_clip_spec(
        "clip_vit_b_32", "ViT-B-32", "laion2b_s34b_b79k", width=512, preprocessing=OPENAI_CLIP_AT_THUMBNAIL_SIZE
    ),
    # Any open_clip CLIP whose architecture comes with its weights: a folder in open_clip's `local-dir:` layout
    # (open_clip_config.json beside one weights file; see backbones/checkpoint_dir.py).
    "open_clip_dir": _open_clip_spec("open_clip_dir", None, None, width=None, preprocessing=None),
}


def has_text_tower(model: str) -> bool:
    """Whether backbone `model` embeds text too (a CLIP), known without torch; False for an unknown name."""
    spec = BACKBONE_SPECS.get(model)
    return spec is not None and spec.text_tower


def require_text_tower(model: str) -> None:
    """NoTextTower, in one line naming the models that have one, unless `model` has a text tower."""
    if not has_text_tower(model):
        with_text = [name for name in BACKBONES if has_text_tower(name)]
        raise NoTextTower(f"{model} has no text tower: text needs a CLIP model ({', '.join(with_text)})")
