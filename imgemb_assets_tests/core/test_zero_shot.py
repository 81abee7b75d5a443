"""Zero-shot agreement on constructed vectors whose nearest prompt is known, so a broken score fails a test:
the agreement, its chance level (labels shuffled, as for kNN agreement), the noise label of random weights,
the prompts, and what is left out; a partition scored per model from a source of class vectors, and the
evaluation step's source refusing, in one line and without building a text tower, what it cannot pair.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from imgemb_assets.core.embedding.model_settings import EmbeddingSettings
from imgemb_assets.core.evaluation.scores import evaluate_embeddings, evaluate_partition
from imgemb_assets.core.evaluation.zero_shot import StepZeroShot
from imgemb_assets.core.evaluation.zero_shot_agreement import (
    NOISE_LABEL,
    ZERO_SHOT_PROMPT_TEMPLATE,
    ZeroShotClasses,
    zero_shot_agreement,
    zero_shot_prompts,
)
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.embedding_column import embedding_array
from imgemb_assets.core.lake.lake import Lake

CLASSES = ["bags", "hats", "shoes"]
# One text vector per class prompt: three axes of a 4-d space.
CLASS_VECTORS = np.eye(3, 4, dtype=np.float32)


def _towards(class_index: int, off: float = 0.1) -> np.ndarray:
    """A vector nearest (cosine) to one class's vector, with a little of the fourth axis."""
    vector = np.full(4, 0.0, np.float32)
    vector[class_index], vector[3] = 1.0, off
    return vector


def test_images_nearest_their_own_prompt_agree_fully_and_chance_is_the_shuffled_labels_share() -> None:
    labels = ["bags"] * 4 + ["hats"] * 4 + ["shoes"] * 2
    vectors = np.stack([_towards(CLASSES.index(label)) for label in labels])

    result = zero_shot_agreement(vectors, CLASS_VECTORS, CLASSES, labels, weights_are_random=False)

    assert result.agreement == 1.0
    # Predictions are the labels: shuffled, an image keeps its label with probability its label's share.
    assert result.chance == pytest.approx(0.4 * 0.4 + 0.4 * 0.4 + 0.2 * 0.2)
    assert (result.classes, result.scored, result.left_out, result.notes) == (3, 10, 0, ())
    assert result.caveat is None and "zero_shot_caveat" not in result.metadata()


def test_the_agreement_counts_each_image_whose_nearest_prompt_is_its_label() -> None:
    # Ten shoes: seven nearest the shoes prompt, three nearest the bags prompt; five hats, all nearest hats.
    labels = ["shoes"] * 10 + ["hats"] * 5
    vectors = np.stack([_towards(2)] * 7 + [_towards(0)] * 3 + [_towards(1)] * 5)

    result = zero_shot_agreement(vectors, CLASS_VECTORS, CLASSES, labels, weights_are_random=False)

    assert result.agreement == pytest.approx(12 / 15)
    # predicted: bags 3, hats 5, shoes 7; labelled: hats 5, shoes 10 -> (5*5 + 7*10) / 15^2
    assert result.chance == pytest.approx((5 * 5 + 7 * 10) / 225)


def test_nearest_is_by_cosine_not_by_dot_product_and_ignores_lengths() -> None:
    # The bags prompt's vector is ten times longer: by dot product every image would be "bags".
    class_vectors = CLASS_VECTORS * np.array([[10.0], [1.0], [1.0]], np.float32)
    image = np.array([0.6, 0.0, 0.8, 0.0], np.float32)  # cosine 0.6 with bags, 0.8 with shoes
    labels = ["shoes", "shoes", "bags"]
    vectors = np.stack([image, image * 1000, np.array([0.8, 0.0, 0.6, 0.0], np.float32)])

    result = zero_shot_agreement(vectors, class_vectors, CLASSES, labels, weights_are_random=False)

    assert result.agreement == 1.0


def test_a_collapsed_model_that_names_one_class_for_every_image_scores_exactly_chance() -> None:
    labels = ["bags"] * 6 + ["hats"] * 3 + ["shoes"] * 1
    vectors = np.stack([_towards(1, off=float(n)) for n in range(10)])  # every image nearest hats

    result = zero_shot_agreement(vectors, CLASS_VECTORS, CLASSES, labels, weights_are_random=True)

    assert result.agreement == pytest.approx(0.3) and result.chance == pytest.approx(0.3)
    assert result.caveat == NOISE_LABEL == "noise: random weights"
    assert result.metadata() == {
        "zero_shot_classes": 3,
        "zero_shot_scored": 10,
        "zero_shot_agreement": 0.3,
        "zero_shot_agreement_chance": 0.3,
        "zero_shot_caveat": "noise: random weights",
    }
    assert result.markdown_row() == "| zero-shot agreement, 3 prompts | 0.300 (chance 0.300) (noise: random weights) |"


def test_images_without_a_direction_a_label_or_a_prompt_are_left_out_and_counted() -> None:
    labels = pa.array(["shoes", None, "boots", "hats", "shoes"])
    vectors = np.stack([_towards(2), _towards(1), _towards(2), _towards(0), np.zeros(4, np.float32)])
    vectors[3, 0] = np.nan

    result = zero_shot_agreement(vectors, CLASS_VECTORS, CLASSES, labels, weights_are_random=False)

    assert (result.agreement, result.chance, result.scored, result.left_out) == (1.0, 1.0, 1, 4)
    assert result.notes == (
        "2 vectors not finite or of zero length: left out",
        "1 vectors without a label: left out",
        "1 vectors whose label has no prompt: left out",
    )


def test_one_class_or_nothing_to_score_gives_no_agreement() -> None:
    one = zero_shot_agreement(np.stack([_towards(0)]), CLASS_VECTORS[:1], ["bags"], ["bags"], weights_are_random=False)
    assert (one.agreement, one.chance) == (None, None) and "needs two classes" in one.notes[0]
    none = zero_shot_agreement(np.stack([_towards(0)]), CLASS_VECTORS, CLASSES, [None], weights_are_random=False)
    assert none.agreement is None and "needs an image" in none.notes[-1]


def test_class_vectors_that_do_not_fit_are_refused() -> None:
    vectors, labels = np.stack([_towards(0)]), ["bags"]
    with pytest.raises(ValueError, match=r"one class vector per class, \(3, 4\), got shape \(2, 4\)"):
        zero_shot_agreement(vectors, CLASS_VECTORS[:2], CLASSES, labels, weights_are_random=False)
    with pytest.raises(ValueError, match=r"got shape \(3, 3\)"):
        zero_shot_agreement(vectors, CLASS_VECTORS[:, :3], CLASSES, labels, weights_are_random=False)
    with pytest.raises(ValueError, match="a class is given twice: \\['bags'\\]"):
        zero_shot_agreement(vectors, CLASS_VECTORS, ["bags", "bags", "hats"], labels, weights_are_random=False)
    with pytest.raises(ValueError, match="no direction"):
        zero_shot_agreement(vectors, CLASS_VECTORS * 0, CLASSES, labels, weights_are_random=False)
    with pytest.raises(ValueError, match="expected 2 image vectors"):
        zero_shot_agreement(vectors, CLASS_VECTORS, CLASSES, ["bags", "hats"], weights_are_random=False)


def test_prompts_are_one_per_distinct_label_from_the_template() -> None:
    assert ZERO_SHOT_PROMPT_TEMPLATE == "a photo of a {value}"
    assert zero_shot_prompts(pa.chunked_array([["shoes", None], ["bags", "shoes"]])) == {
        "bags": "a photo of a bags",
        "shoes": "a photo of a shoes",
    }
    assert zero_shot_prompts([3, 1, 3], template="product {value}, {value}") == {
        "1": "product 1, 1",
        "3": "product 3, 3",
    }
    for template in ("a photo", "{value} of {kind}", "{value} }"):
        with pytest.raises(ValueError, match="template"):
            zero_shot_prompts([], template=template)


def test_the_evaluation_shows_the_zero_shot_score_beside_knn_agreement() -> None:
    labels = ["bags", "hats", "shoes"] * 4
    vectors = np.stack([_towards(CLASSES.index(label), off=0.01 * n) for n, label in enumerate(labels)])
    evaluation = evaluate_embeddings(vectors, labels, weights_are_random=True)
    assert "zero-shot" not in evaluation.markdown() and "zero_shot_agreement" not in evaluation.metadata()

    zero_shot = zero_shot_agreement(vectors, CLASS_VECTORS, CLASSES, labels, weights_are_random=True)
    shown = dataclasses.replace(evaluation, zero_shot=zero_shot)

    lines = shown.markdown().splitlines()
    knn = next(n for n, line in enumerate(lines) if line.startswith("| kNN agreement"))
    assert lines[knn + 1] == "| zero-shot agreement, 3 prompts | 1.000 (chance 0.333) (noise: random weights) |"
    assert shown.metadata()["zero_shot_agreement"] == 1.0 and shown.metadata()["zero_shot_caveat"] == NOISE_LABEL


def _partition(rows: list[tuple[str, np.ndarray, str | None]]) -> pa.Table:
    """An image_embeddings partition: (model_id, vector, category) per image."""
    return pa.table(
        {
            "model_id": [model_id for model_id, _, _ in rows],
            "embedding": embedding_array(np.stack([vector for _, vector, _ in rows])),
            "category": [label for _, _, label in rows],
        }
    )


def test_a_partition_is_scored_per_model_from_the_source_and_a_reason_is_kept() -> None:
    clip, other, resnet = "open_clip/m/random-seed0/fp32", "open_clip/m/random-seed1/fp32", "torchvision/r/x/fp32"
    rows = [(model_id, _towards(n % 3), CLASSES[n % 3]) for model_id in (clip, other, resnet) for n in range(6)]
    asked: list[str] = []

    def source(model_id: str) -> ZeroShotClasses | str | None:
        asked.append(model_id)
        if model_id == clip:
            return ZeroShotClasses(clip, tuple(CLASSES), CLASS_VECTORS)
        return "not these weights" if model_id == other else None

    evaluation = evaluate_partition(_partition(rows), "p", "category", zero_shot=source)

    assert sorted(asked) == sorted([clip, other, resnet])
    by_model = {row["model_id"]: row for row in evaluation.table.to_pylist()}
    assert by_model[clip]["zero_shot_agreement"] == 1.0 and by_model[clip]["zero_shot_classes"] == 3
    assert by_model[clip]["zero_shot_agreement_chance"] == pytest.approx(1 / 3)
    for model_id in (other, resnet):
        values = [by_model[model_id][f"zero_shot_{name}"] for name in ("agreement", "agreement_chance", "classes")]
        assert values == [None, None, None]
    assert evaluation.zero_shot_skipped == {other: "not these weights"}
    assert "zero-shot not scored: not these weights" in evaluation.by_model[other].markdown()
    assert "zero-shot" not in evaluation.by_model[resnet].markdown()
    # Without the label column there is nothing to agree with: the source is not asked.
    asked.clear()
    evaluate_partition(_partition(rows).drop_columns(["category"]), "p", "category", zero_shot=source)
    assert asked == []


def test_the_step_source_pairs_only_the_configured_text_tower_and_builds_nothing_to_refuse(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    resnet = StepZeroShot(EmbeddingSettings(weights="random", model="resnet50", device="cpu"), lake, "category")
    assert resnet("torchvision/resnet50/random-seed0/fp32") is None  # no text tower anywhere: nothing to say
    refusal = resnet("open_clip/clip_vit_b_32/random-seed0/fp32")
    assert isinstance(refusal, str) and "resnet50, which has no text tower" in refusal

    clip_seed1 = EmbeddingSettings(weights="random:1", model="clip_vit_b_32", device="cpu")
    other_weights = StepZeroShot(clip_seed1, lake, "category")("open_clip/clip_vit_b_32/random-seed0/fp32")
    assert isinstance(other_weights, str) and "open_clip/clip_vit_b_32/random-seed1/fp32" in other_weights
    no_sales = StepZeroShot(clip_seed1, lake, "category")("open_clip/clip_vit_b_32/random-seed1/fp32")
    assert no_sales == "no sales table to take the classes from"
    lake.overwrite(tables.SALES, pa.table({"image_id": ["a"], "sales": [1.0]}))
    source = StepZeroShot(clip_seed1, lake, "category")
    assert source("open_clip/clip_vit_b_32/random-seed1/fp32") == (
        "no column 'category' in the sales table to take the classes from"
    )
    assert source.text_tower_builds == 0


def test_an_evaluation_table_written_before_the_zero_shot_columns_takes_them(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    schema = tables.EMBEDDING_EVALUATION_SCHEMA
    before = pa.schema([column for column in schema if not column.name.startswith("zero_shot_")])
    row = {"model_id": "m", "weights_are_random": True, "vectors": 6, "labelled_sampled": 6, "labels": 3}
    lake.write_partition(tables.EMBEDDING_EVALUATION, pa.Table.from_pylist([row | {"prefix": "a"}], before), "a")
    scored = row | {"prefix": "b", "zero_shot_agreement": 0.5, "zero_shot_agreement_chance": 0.25}
    lake.write_partition(tables.EMBEDDING_EVALUATION, pa.Table.from_pylist([scored], schema), "b")
    assert lake.schema(tables.EMBEDDING_EVALUATION).names == schema.names
    read = {r["prefix"]: r for r in lake.read(tables.EMBEDDING_EVALUATION).to_pylist()}
    assert read["a"]["zero_shot_agreement"] is None and read["b"]["zero_shot_agreement"] == 0.5
