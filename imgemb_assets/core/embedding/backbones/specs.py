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
BackboneName = Literal["resnet50", "resnet18", "vit_b_16"]
BACKBONES: Final = get_args(BackboneName)
# The module under core/embedding/backbones/ that builds a family's models.
FamilyName = Literal["resnet", "vit"]
# The first part of a model_id: whose architecture and weights names the rest of the id uses.
LibraryName = Literal["torchvision"]


@dataclass(frozen=True)
class Normalization:
    """What the backbone was trained on: per-channel mean and std of [0, 1] pixels (the article's `Normalize`)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# torchvision's weights for its backbones were all trained on ImageNet, normalized so.
IMAGENET_NORMALIZATION: Final = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


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


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone name: which family builds it, from what, and the vectors it writes.

    architecture: the library's own name for it (torchvision's builder).
    weights: the library's names of its pretrained weights (torchvision's WeightsEnum class).
    default_weights: what `DEFAULT` names among them today.
    head: the attribute holding the classifier, replaced by Identity.
    width: the vector width with the classifier removed.
    """

    name: str
    family: FamilyName
    library: LibraryName
    architecture: str
    weights: str
    default_weights: str
    head: str
    width: int
    preprocessing: Preprocessing = IMAGENET_AT_THUMBNAIL_SIZE


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
}
