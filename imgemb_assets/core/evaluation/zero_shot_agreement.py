"""Zero-shot agreement: how often an image's nearest class prompt, encoded by the text tower paired with its image
tower (a CLIP), is its own label, next to what shuffled labels would give.

Prompts are built from the distinct values of the label column (`zero_shot_prompts`, "a photo of a {value}");
`zero_shot.StepZeroShot` encodes them once per step. The rules for awkward inputs are those of `scores`: vectors
without a direction and rows without a label (or whose label has no prompt) are left out and counted."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import pyarrow as pa

from imgemb_assets.core.evaluation.rows import ROWS_AT_ONCE, row_norms, shown

ZERO_SHOT_PROMPT_TEMPLATE: Final = "a photo of a {value}"


NOISE_LABEL: Final = "noise: random weights"


@dataclass(frozen=True)
class ZeroShotAgreement:
    """How often an image's nearest class prompt (cosine) is its own label, and what shuffled labels would give."""

    agreement: float | None  # share of scored images whose nearest prompt is their label; None when not computed
    chance: float | None  # expected agreement were the labels shuffled among the scored images
    classes: int  # class prompts given
    scored: int  # images scored: valid vector, and a label with a prompt
    left_out: int  # images not scored: no direction, no label, or a label without a prompt
    weights_are_random: bool
    notes: tuple[str, ...] = ()

    @property
    def caveat(self) -> str | None:
        """NOISE_LABEL when the weights are random: the agreement then says nothing about the images."""
        return NOISE_LABEL if self.weights_are_random else None

    def markdown_row(self) -> str:
        caveat = f" ({self.caveat})" if self.caveat else ""
        return (
            f"| zero-shot agreement, {self.classes} prompts | {shown(self.agreement)} "
            f"(chance {shown(self.chance)}){caveat} |"
        )

    def metadata(self) -> dict[str, float | int | str]:
        """Plain values for asset metadata, beside the kNN score's; a score not computed is left out."""
        values: dict[str, float | int | str] = {
            "zero_shot_classes": self.classes,
            "zero_shot_scored": self.scored,
        }
        if self.agreement is not None:
            values["zero_shot_agreement"] = round(self.agreement, 4)
        if self.chance is not None:
            values["zero_shot_agreement_chance"] = round(self.chance, 4)
        if self.caveat:
            values["zero_shot_caveat"] = self.caveat
        return values


def zero_shot_prompts(
    labels: Sequence[object | None] | pa.Array | pa.ChunkedArray, template: str = ZERO_SHOT_PROMPT_TEMPLATE
) -> dict[str, str]:
    """One prompt per distinct label value (nulls left out), value (as text) -> prompt, in sorted order of value.

    `template` holds `{value}` once or more; ValueError otherwise.
    """
    if isinstance(labels, (pa.Array, pa.ChunkedArray)):
        labels = labels.to_pylist()
    if "{value}" not in template:
        raise ValueError(f"a zero-shot prompt template must hold {{value}}, got {template!r}")
    try:
        template.format(value="")  # checked whatever the labels: other fields, or stray braces
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"the zero-shot prompt template {template!r} is not usable: {exc!r}") from exc
    return {value: template.format(value=value) for value in sorted({str(v) for v in labels if v is not None})}


def zero_shot_agreement(
    image_vectors: np.ndarray,
    class_vectors: np.ndarray,
    classes: Sequence[str],
    labels: Sequence[object | None] | pa.Array | pa.ChunkedArray,
    *,
    weights_are_random: bool,
) -> ZeroShotAgreement:
    """Zero-shot labels against known ones: image i is labelled with the class whose vector is nearest by cosine.

    `image_vectors` (N, width): one model's image vectors; `labels`: their N labels (null for
    unknown), compared as text; `class_vectors` (C, width): the text tower's vectors of the C
    prompts of `classes` (`zero_shot_prompts`), in that order, from the text tower paired with
    the image tower that made `image_vectors`. Images without a direction or a label, or whose
    label has no prompt, are left out and counted. The chance level is the kNN score's notion:
    the agreement expected were the labels shuffled among the scored images, sum over classes
    of (share predicted c) x (share labelled c); it is 1/C when predictions spread evenly, and
    the share of the one class a collapsed model names for every image. ValueError when the
    class vectors do not fit (count, width, a class twice, a vector with no direction).
    """
    if isinstance(labels, (pa.Array, pa.ChunkedArray)):
        labels = labels.to_pylist()
    classes = [str(c) for c in classes]
    if image_vectors.ndim != 2 or image_vectors.shape[0] != len(labels):
        raise ValueError(
            f"expected {len(labels)} image vectors in an (N, width) array, got shape {image_vectors.shape}"
        )
    if class_vectors.ndim != 2 or class_vectors.shape != (len(classes), image_vectors.shape[1]):
        raise ValueError(
            f"expected one class vector per class, ({len(classes)}, {image_vectors.shape[1]}), "
            f"got shape {class_vectors.shape}"
        )
    if len(set(classes)) != len(classes):
        raise ValueError(f"a class is given twice: {sorted(c for c in set(classes) if classes.count(c) > 1)}")
    class_norms = row_norms(class_vectors)
    if not np.all(np.isfinite(class_norms) & (class_norms > 0)):
        raise ValueError("a class vector is all zero or not finite: it has no direction to compare")

    notes: list[str] = []
    position = {c: n for n, c in enumerate(classes)}
    norms = row_norms(image_vectors)
    valid = np.isfinite(norms) & (norms > 0)
    label_texts = [None if label is None else str(label) for label in labels]
    valid_rows = np.flatnonzero(valid).tolist()
    rows = np.array([row for row in valid_rows if label_texts[row] in position], dtype=np.int64)
    unlabelled = sum(1 for row in valid_rows if label_texts[row] is None)
    unprompted = len(valid_rows) - len(rows) - unlabelled
    if invalid := len(labels) - len(valid_rows):
        notes.append(f"{invalid} vectors not finite or of zero length: left out")
    if unlabelled:
        notes.append(f"{unlabelled} vectors without a label: left out")
    if unprompted:
        notes.append(f"{unprompted} vectors whose label has no prompt: left out")
    truth = np.array([position[label_texts[row]] for row in rows.tolist()], dtype=np.int64)
    agreement = chance = None
    if len(classes) < 2:
        notes.append("zero-shot agreement needs two classes (with one, every image agrees): not computed")
    elif not len(rows):
        notes.append("zero-shot agreement needs an image with a valid vector and a prompted label: not computed")
    else:
        predicted = _nearest_class(image_vectors, norms, rows, class_vectors / class_norms[:, None])
        agreement = float((predicted == truth).mean())
        shares = np.bincount(predicted, minlength=len(classes)) * np.bincount(truth, minlength=len(classes))
        chance = float(shares.sum() / len(rows) ** 2)
    return ZeroShotAgreement(
        agreement=agreement,
        chance=chance,
        classes=len(classes),
        scored=len(rows),
        left_out=len(labels) - len(rows),
        weights_are_random=weights_are_random,
        notes=tuple(notes),
    )


def _nearest_class(vectors: np.ndarray, norms: np.ndarray, rows: np.ndarray, unit_classes: np.ndarray) -> np.ndarray:
    """Index of the most similar unit class vector for each of `rows`, in bounded float64 blocks; ties: the first."""
    nearest = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(rows), ROWS_AT_ONCE):
        chosen = rows[start : start + ROWS_AT_ONCE]
        unit = vectors[chosen].astype(np.float64) / norms[chosen, None]
        nearest[start : start + ROWS_AT_ONCE] = np.argmax(unit @ unit_classes.T.astype(np.float64), axis=1)
    return nearest


@dataclass(frozen=True)
class ZeroShotClasses:
    """The class prompts of a label column, encoded by the text tower paired with image vectors of `model_id`.

    `classes`: the label values (as text) the prompts were made from, in the order of `vectors`' rows.
    """

    model_id: str
    classes: tuple[str, ...]
    vectors: np.ndarray  # (len(classes), width), the text tower's vectors of the prompts


# Per model_id of a partition: its class vectors, the reason (one line) they cannot be had, or None for a model
# that has no text tower and none was asked for (a ResNet): that model gets no zero-shot score and no note.
ZeroShotSource = Callable[[str], "ZeroShotClasses | str | None"]
